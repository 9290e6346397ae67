//! chatd config files for tests, built by section and key instead of by string concatenation
//! and `replace`.

use std::fmt;
use std::path::Path;

/// A config file: sections of `key = value` pairs, in the order they were first set. Values
/// are TOML as written (`"1000000"`, `"\"150ms\""`, `"[\"127.0.0.1:0\"]"`); [`Config::set_str`]
/// and the typed setters quote for you. Setting a key again replaces its value in place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    sections: Vec<Section>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Section {
    name: String,
    keys: Vec<(String, String)>,
}

impl Config {
    /// An empty file.
    pub fn new() -> Config {
        Config::default()
    }

    /// The config every test daemon starts from: loopback on an ephemeral port, a short
    /// partial-line pause, a short shutdown grace, an admin socket anyone in the owner's group
    /// may use. `admin.socket` and `server.state-dir` are filled in by the daemon that uses it
    /// (its own temp dir) unless set here.
    pub fn test() -> Config {
        Config::new()
            .listen(&["127.0.0.1:0"])
            .set_str("server", "partial-line-flush", "150ms")
            .set_str("server", "shutdown-grace", "3s")
            .set("admin", "mode", "0o660")
            .set_str("admin", "group", "")
    }

    /// Reads a file in the shape this type writes: `[section]` headers, `key = value` lines,
    /// blank lines and `#` comments. Panics on anything else (multi-line values, say): such a
    /// file belongs in the test as text.
    pub fn parse(text: &str) -> Config {
        Config::new().raw(text)
    }

    /// Sets `section.key` to the TOML `value`, as written.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<String>) -> Config {
        let value = value.into();
        let s = match self.sections.iter().position(|s| s.name == section) {
            Some(i) => &mut self.sections[i],
            None => {
                self.sections.push(Section {
                    name: section.to_owned(),
                    keys: Vec::new(),
                });
                self.sections.last_mut().expect("just pushed")
            }
        };
        match s.keys.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => s.keys.push((key.to_owned(), value)),
        }
        self
    }

    /// Sets `section.key` to the string `value` (quoted and escaped here).
    pub fn set_str(self, section: &str, key: &str, value: &str) -> Config {
        self.set(section, key, quote(value))
    }

    /// Sets several keys of one section, values as TOML as written.
    pub fn section<'a>(
        mut self,
        name: &str,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Config {
        for (k, v) in pairs {
            self = self.set(name, k, v);
        }
        self
    }

    /// Merges config text (`[section]` headers and `key = value` lines, as [`Config::parse`]
    /// reads them) key by key: what it sets replaces what was set before.
    pub fn raw(mut self, text: &str) -> Config {
        let mut section: Option<String> = None;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.trim().to_owned());
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("Config::raw takes `key = value` lines, not {line:?}"));
            let section = section
                .as_deref()
                .unwrap_or_else(|| panic!("Config::raw: {line:?} is outside any [section]"));
            self = self.set(section, key.trim(), value.trim());
        }
        self
    }

    /// Removes `section.key` (a section left empty is still written, as an empty table).
    pub fn remove(mut self, section: &str, key: &str) -> Config {
        if let Some(s) = self.sections.iter_mut().find(|s| s.name == section) {
            s.keys.retain(|(k, _)| k != key);
        }
        self
    }

    /// The TOML value of `section.key`, as written.
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.sections
            .iter()
            .find(|s| s.name == section)?
            .keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `server.listen`: the addresses to bind.
    pub fn listen(self, addrs: &[&str]) -> Config {
        let list: Vec<String> = addrs.iter().map(|a| quote(a)).collect();
        self.set("server", "listen", format!("[{}]", list.join(", ")))
    }

    /// `admin.socket`.
    pub fn admin_socket(self, path: &Path) -> Config {
        self.set_str("admin", "socket", &path.display().to_string())
    }

    /// `server.state-dir`.
    pub fn state_dir(self, path: &Path) -> Config {
        self.set_str("server", "state-dir", &path.display().to_string())
    }

    /// `room.motd`.
    pub fn motd(self, text: &str) -> Config {
        self.set_str("room", "motd", text)
    }

    /// Lifts flood control (`limits.message-rate` and `message-burst`), for tests that send
    /// bursts; the same as [`super::NO_RATE_LIMIT`].
    pub fn no_rate_limit(self) -> Config {
        self.raw(super::NO_RATE_LIMIT)
    }

    /// Fills in `admin.socket` (`dir/admin.sock`) and `server.state-dir` (`dir/state`) where
    /// they are not set.
    pub fn with_paths_in(mut self, dir: &Path) -> Config {
        if self.get("admin", "socket").is_none() {
            self = self.admin_socket(&dir.join("admin.sock"));
        }
        if self.get("server", "state-dir").is_none() {
            self = self.state_dir(&dir.join("state"));
        }
        self
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.sections.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "[{}]", s.name)?;
            for (k, v) in &s.keys {
                writeln!(f, "{k} = {v}")?;
            }
        }
        Ok(())
    }
}

/// `s` as a TOML basic string.
pub fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The admin socket a config file names (`admin.socket`), if it names one.
pub fn admin_socket_of(text: &str) -> Option<std::path::PathBuf> {
    let table: toml::Table = toml::from_str(text).ok()?;
    table
        .get("admin")?
        .get("socket")?
        .as_str()
        .map(std::path::PathBuf::from)
}
