//! Name rules: what a user may call themselves and when two names count as the same.
//!
//! A name is normalised (NFKC), then checked against a small safe alphabet: letters and digits
//! that UTS #39 allows in identifiers, plus `_`, `-` and `.`, starting with a letter or digit, all
//! from one script (so `аlice` with a Cyrillic `а` is refused outright). Two names are the same
//! when their keys are equal; the key is the UTS #39 confusable skeleton of the lower-cased NFKC
//! form, so a look-alike of an online name (`аlісе` in all-Cyrillic, `ALICE`, full-width
//! `ａｌｉｃｅ`) counts as taken. The skeleton also equates a few Latin pairs such as `rn`/`m`; we
//! accept those false positives, as refusing a name is cheap and impersonation is not.
//! Names that could pass for the server or its staff are reserved. Nothing here touches a socket.

use crate::protocol::code;
use unicode_normalization::UnicodeNormalization;
use unicode_security::{GeneralSecurityProfile, MixedScript};

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
    /// Letters from more than one script (the classic look-alike trick).
    #[error("a name must use letters of a single script")]
    MixedScripts,
    /// A built-in or configured reserved name.
    #[error("that name is reserved")]
    Reserved,
    /// Someone online already has it, or a name that looks the same.
    #[error("that name (or one that looks like it) is already in use")]
    Taken,
    /// `/reclaim` of a name held by a connection the token was not issued to, or with a
    /// malformed token.
    #[error("that name is held by a connection this token was not issued to")]
    ReclaimRefused,
    /// The room's shared name registry (a cluster's) cannot be reached right now.
    #[error("names cannot be taken right now: this server cannot reach the rest of the room")]
    Unavailable,
}

impl NameError {
    /// The stable error code sent in `*** ERR <code> ...`.
    pub fn code(&self) -> &'static str {
        match self {
            NameError::Empty
            | NameError::TooLong { .. }
            | NameError::BadCharacter
            | NameError::MixedScripts => code::NAME_INVALID,
            NameError::Reserved => code::NAME_RESERVED,
            NameError::Taken => code::NAME_TAKEN,
            NameError::ReclaimRefused => code::RECLAIM_REFUSED,
            NameError::Unavailable => code::UNAVAILABLE,
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
            .copied()
            .chain(extra_reserved.iter().map(|s| s.trim()))
            .map(key_of)
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
        let letter_or_digit = |c: char| c.is_alphanumeric() && c.identifier_allowed();
        if !letter_or_digit(first)
            || !chars.all(|c| letter_or_digit(c) || matches!(c, '_' | '-' | '.'))
        {
            return Err(NameError::BadCharacter);
        }
        if !display.as_str().is_single_script() {
            return Err(NameError::MixedScripts);
        }
        let key = key_of(&display);
        if self.reserved.contains(&key) {
            return Err(NameError::Reserved);
        }
        Ok(Name { display, key })
    }
}

/// The key under which a name typed by someone (a `/msg` target, `chatctl kick NAME`) is found.
pub fn lookup_key(raw: &str) -> String {
    key_of(raw.trim())
}

/// The uniqueness key of a name: the confusable skeleton of its lower-cased NFKC form.
fn key_of(name: &str) -> String {
    let folded: String = name.nfkc().flat_map(char::to_lowercase).collect();
    // The skeleton may map to upper-case look-alikes; fold again so case never matters.
    unicode_security::skeleton(&folded)
        .flat_map(char::to_lowercase)
        .collect()
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
        assert_eq!(n.as_ref().map(|n| n.display.as_str()), Some("Alice_1"));
        assert_eq!(n.map(|n| n.key), Some(key_of("alice_1")));
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
        assert_eq!(a, Ok(key_of("alice")));
        assert_eq!(r.validate("ALICE").map(|n| n.key), Ok(key_of("alice")));
    }

    #[test]
    fn look_alikes_share_a_key_or_are_refused() {
        let r = rules();
        let latin = r.validate("alice").map(|n| n.key);
        // All-Cyrillic look-alike: allowed as a name, but it is the same name.
        let cyrillic = r.validate("\u{430}l\u{456}\u{441}\u{435}");
        assert!(cyrillic.is_err() || cyrillic.map(|n| n.key) == latin);
        // Mixed Latin and Cyrillic is refused outright.
        assert_eq!(r.validate("\u{430}lice"), Err(NameError::MixedScripts));
        // A Greek omicron in a Latin name.
        assert_eq!(r.validate("b\u{3bf}b"), Err(NameError::MixedScripts));
        assert_eq!(r.validate("ＡＤＭＩＮ"), Err(NameError::Reserved));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

        /// Nothing panics, and an accepted name validates to itself (keys are stable).
        #[test]
        fn validate_never_panics_and_is_idempotent(raw in "\\PC{0,40}") {
            let r = NameRules::new(24, &[]);
            if let Ok(name) = r.validate(&raw) {
                let again = r.validate(&name.display);
                proptest::prop_assert_eq!(again.map(|n| n.key), Ok(name.key));
            }
        }
    }
}
