//! Name rules: what a user may call themselves and when two names count as the same.
//!
//! A name is normalised (NFKC), then checked against a small safe alphabet: Unicode letters and
//! digits plus `_`, `-` and `.`, starting with a letter or digit. Two names are the same when
//! their keys are equal; the key is the NFKC form, lower-cased. Names that could pass for the
//! server or its staff are reserved. Nothing here touches a socket.

use unicode_normalization::UnicodeNormalization;

/// Names nobody may take, compared by key.
pub const BUILTIN_RESERVED: &[&str] = &[
    "server",
    "admin",
    "administrator",
    "root",
    "system",
    "chatd",
    "chatctl",
    "operator",
    "op",
    "sysop",
    "moderator",
    "mod",
    "staff",
    "notice",
    "you",
];

/// A validated name: what is shown, and the key used for uniqueness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    /// The name as shown to others (NFKC-normalised).
    pub display: String,
    /// Case-insensitive identity of the name.
    pub key: String,
}

/// Why a name was refused; `code()` is the protocol's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Nothing but blanks.
    #[error("a name cannot be empty")]
    Empty,
    /// More characters than `names.max-length`.
    #[error("a name may have at most {max} characters (names.max-length)")]
    TooLong {
        /// The configured maximum.
        max: usize,
    },
    /// A character outside the allowed set.
    #[error(
        "names may only use letters, digits, '_', '-' and '.', and must start with a letter or digit"
    )]
    BadCharacter,
    /// A built-in or configured reserved name.
    #[error("that name is reserved")]
    Reserved,
    /// Someone online already has it (case-insensitively).
    #[error("that name is already in use, pick another one")]
    Taken,
}

impl NameError {
    /// The stable error code sent in `*** ERR <code> ...`.
    pub fn code(&self) -> &'static str {
        match self {
            NameError::Empty | NameError::TooLong { .. } | NameError::BadCharacter => {
                "name-invalid"
            }
            NameError::Reserved => "name-reserved",
            NameError::Taken => "name-taken",
        }
    }
}

/// The configured name rules.
#[derive(Debug, Clone)]
pub struct NameRules {
    max_len: usize,
    reserved: Vec<String>,
}

impl NameRules {
    /// Rules with a maximum length and extra reserved names (beyond the built-in ones).
    pub fn new(max_len: usize, extra_reserved: &[String]) -> Self {
        let reserved = BUILTIN_RESERVED
            .iter()
            .map(|s| (*s).to_owned())
            .chain(extra_reserved.iter().map(|s| key_of(s.trim())))
            .collect();
        NameRules { max_len, reserved }
    }

    /// Validates `raw` (surrounding blanks ignored) and returns the normalised name.
    pub fn validate(&self, raw: &str) -> Result<Name, NameError> {
        let display: String = raw.trim().nfkc().collect();
        let mut chars = display.chars();
        let Some(first) = chars.next() else {
            return Err(NameError::Empty);
        };
        if display.chars().count() > self.max_len {
            return Err(NameError::TooLong { max: self.max_len });
        }
        if !first.is_alphanumeric()
            || !chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(NameError::BadCharacter);
        }
        let key = key_of(&display);
        if self.reserved.iter().any(|r| *r == key) {
            return Err(NameError::Reserved);
        }
        Ok(Name { display, key })
    }
}

/// The key under which a name typed by someone (a `/msg` target, `chatctl kick NAME`) is found.
pub fn lookup_key(raw: &str) -> String {
    key_of(raw.trim())
}

/// The uniqueness key of a name.
fn key_of(name: &str) -> String {
    name.nfkc().flat_map(char::to_lowercase).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> NameRules {
        NameRules::new(10, &["Bot".to_owned()])
    }

    #[test]
    fn accepts_ordinary_names_and_trims() {
        let n = rules().validate("  Alice_1 ").ok();
        assert_eq!(
            n.map(|n| (n.display, n.key)),
            Some(("Alice_1".into(), "alice_1".into()))
        );
        assert!(rules().validate("José").is_ok());
    }

    #[test]
    fn refuses_bad_names_with_codes() {
        let r = rules();
        assert_eq!(r.validate("   "), Err(NameError::Empty));
        assert_eq!(
            r.validate("abcdefghijk"),
            Err(NameError::TooLong { max: 10 })
        );
        for bad in [
            "a b",
            "*** x",
            "a:b",
            "-lead",
            "a\u{202e}b",
            "ta\tb",
            "a\u{200b}",
        ] {
            assert_eq!(r.validate(bad), Err(NameError::BadCharacter), "{bad:?}");
        }
        assert_eq!(r.validate("SERVER"), Err(NameError::Reserved));
        assert_eq!(r.validate("bot").map(|_| ()), Err(NameError::Reserved));
    }

    #[test]
    fn fullwidth_and_case_variants_share_a_key() {
        let r = rules();
        let a = r.validate("ａｌｉｃｅ").map(|n| n.key);
        assert_eq!(a, Ok("alice".to_owned()));
        assert_eq!(r.validate("ALICE").map(|n| n.key), Ok("alice".to_owned()));
    }
}
