//! Who is online, as far as the server's lines tell: kept for Tab completion.

use std::collections::BTreeMap;

use chat_proto::protocol::Event;

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
    pub fn observe(&mut self, event: &Event<'_>) -> Option<(String, String)> {
        match *event {
            Event::Who { names, .. } => {
                self.clear();
                for name in names.iter() {
                    self.insert(name);
                }
            }
            Event::Join { name }
            | Event::Welcome { name, .. }
            | Event::Chat { name, .. }
            | Event::Action { name, .. }
            | Event::Private { from: name, .. } => self.insert(name),
            Event::Leave { name, .. } | Event::Kick { name, .. } => self.remove(name),
            Event::Nick { old, new } => {
                self.remove(old);
                self.insert(new);
                return Some((old.to_owned(), new.to_owned()));
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut Roster, line: &str) -> Option<(String, String)> {
        r.observe(&Event::parse(line))
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
