//! Who is online, as far as the server's lines tell: kept for Tab completion.

use std::collections::BTreeMap;

use chat_proto::protocol::{Incoming, kind, split_subject};

/// Online names, keyed case-insensitively (as the server compares them).
#[derive(Debug, Default, Clone)]
pub struct Roster {
    names: BTreeMap<String, String>,
    /// Bumped on every change, so the editor's completion list is rebuilt only then.
    generation: u64,
}

impl Roster {
    /// Forgets everyone (on a new connection).
    pub fn clear(&mut self) {
        self.names.clear();
        self.generation += 1;
    }

    /// Adds a name.
    pub fn insert(&mut self, name: &str) {
        if !name.is_empty() {
            self.names.insert(name.to_lowercase(), name.to_owned());
            self.generation += 1;
        }
    }

    /// Removes a name.
    pub fn remove(&mut self, name: &str) {
        if self.names.remove(&name.to_lowercase()).is_some() {
            self.generation += 1;
        }
    }

    /// Changes whenever the set of names does.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every known name, sorted case-insensitively.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.values().map(String::as_str)
    }

    /// Follows one server line. Returns `Some((old, new))` for a rename.
    pub fn observe(&mut self, line: &Incoming<'_>) -> Option<(String, String)> {
        match *line {
            Incoming::Server { kind, rest } => match kind {
                kind::WHO => {
                    self.clear();
                    // `*** WHO <count> <name> <name> ...`
                    for name in rest.split(' ').skip(1) {
                        self.insert(name);
                    }
                }
                kind::JOIN | kind::WELCOME => self.insert(split_subject(rest).0),
                kind::LEAVE | kind::KICK => self.remove(split_subject(rest).0),
                kind::NICK => {
                    // `*** NICK <old> is now known as <new>`
                    let (old, tail) = split_subject(rest);
                    let new = tail.strip_prefix("is now known as ")?.trim();
                    if new.is_empty() || new.contains(' ') {
                        return None;
                    }
                    self.remove(old);
                    self.insert(new);
                    return Some((old.to_owned(), new.to_owned()));
                }
                _ => {}
            },
            Incoming::Chat { name, .. }
            | Incoming::Action { name, .. }
            | Incoming::Private { from: name, .. } => self.insert(name),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut Roster, line: &str) -> Option<(String, String)> {
        r.observe(&Incoming::parse(line))
    }

    #[test]
    fn follows_who_join_leave_nick_kick() {
        let mut r = Roster::default();
        feed(&mut r, "*** WHO 3 ann Bob cy");
        feed(&mut r, "*** JOIN dee joined");
        feed(&mut r, "*** LEAVE ann left (quit)");
        feed(&mut r, "*** KICK cy was kicked (spam)");
        let renamed = feed(&mut r, "*** NICK bob is now known as rob");
        assert_eq!(renamed, Some(("bob".into(), "rob".into())));
        assert_eq!(r.names().collect::<Vec<_>>(), vec!["dee", "rob"]);
    }
}
