//! The optional client config file, `$XDG_CONFIG_HOME/chatd/client.toml`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Everything the config file may set; every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClientConfig {
    /// Default server.
    #[serde(default)]
    pub server: ServerSection,
    /// Default name (offered at the name prompt).
    pub name: Option<String>,
    /// Display settings.
    #[serde(default)]
    pub ui: UiSection,
}

/// `[server]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerSection {
    /// Host name or address.
    pub host: Option<String>,
    /// TCP port.
    pub port: Option<u16>,
}

/// `[ui]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct UiSection {
    /// Use colours on a terminal (NO_COLOR and pipes still turn them off).
    pub color: bool,
    /// Ring the bell when your name is mentioned.
    pub bell: bool,
    /// Show a `HH:MM` timestamp before each line.
    pub timestamps: bool,
    /// Colour of your own name and messages.
    pub own_color: Colour,
    /// Colours other names are picked from (by a hash of the name, so each name keeps one).
    pub name_colors: Vec<Colour>,
    /// Colour of server notices, joins and leaves.
    pub notice_color: Colour,
    /// Colour of a line mentioning your name.
    pub mention_color: Colour,
}

impl Default for UiSection {
    fn default() -> Self {
        use Colour::*;
        UiSection {
            color: true,
            bell: true,
            timestamps: true,
            own_color: BrightWhite,
            name_colors: vec![
                Red,
                Green,
                Yellow,
                Blue,
                Magenta,
                Cyan,
                BrightRed,
                BrightGreen,
            ],
            notice_color: BrightBlack,
            mention_color: BrightYellow,
        }
    }
}

/// A terminal colour by name, mapped to its SGR foreground code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum Colour {
    Black,
    Red,
    Green,
    Yellow,
    Blue,
    Magenta,
    Cyan,
    White,
    BrightBlack,
    BrightRed,
    BrightGreen,
    BrightYellow,
    BrightBlue,
    BrightMagenta,
    BrightCyan,
    BrightWhite,
}

impl Colour {
    /// The SGR parameter selecting this colour as the foreground.
    pub fn sgr(self) -> u8 {
        use Colour::*;
        match self {
            Black => 30,
            Red => 31,
            Green => 32,
            Yellow => 33,
            Blue => 34,
            Magenta => 35,
            Cyan => 36,
            White => 37,
            BrightBlack => 90,
            BrightRed => 91,
            BrightGreen => 92,
            BrightYellow => 93,
            BrightBlue => 94,
            BrightMagenta => 95,
            BrightCyan => 96,
            BrightWhite => 97,
        }
    }
}

/// Where the config file is looked for when `--config` is not given.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("chatd").join("client.toml"))
}

/// Loads `explicit` (which must exist) or the default file (which may be missing).
pub fn load(explicit: Option<&Path>) -> anyhow::Result<ClientConfig> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_path() {
            Some(p) => (p, false),
            None => return Ok(ClientConfig::default()),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ClientConfig::default());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let config: ClientConfig =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    if config.ui.name_colors.is_empty() {
        anyhow::bail!(
            "invalid config file {}: ui.name-colors must list at least one colour",
            path.display()
        );
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c: ClientConfig = toml::from_str(
            "name = \"ann\"\n[server]\nhost = \"h\"\nport = 7\n[ui]\ncolor = false\nbell = false\n\
             timestamps = false\nown-color = \"cyan\"\nname-colors = [\"red\"]\n\
             notice-color = \"blue\"\nmention-color = \"red\"\n",
        )
        .expect("valid");
        assert_eq!(c.name.as_deref(), Some("ann"));
        assert_eq!(c.server.port, Some(7));
        assert!(!c.ui.bell && !c.ui.color && !c.ui.timestamps);
        assert_eq!(c.ui.name_colors, vec![Colour::Red]);
    }

    #[test]
    fn partial_ui_section_keeps_defaults() {
        let c: ClientConfig = toml::from_str("[ui]\nbell = false\n").expect("valid");
        assert!(!c.ui.bell && c.ui.color);
    }

    #[test]
    fn rejects_unknown_keys() {
        assert!(toml::from_str::<ClientConfig>("colour = true\n").is_err());
    }
}
