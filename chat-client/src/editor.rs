//! The interactive line editor: one input line at the bottom of the terminal, with incoming
//! lines printed above it without disturbing what is half typed.
//!
//! One mutex guards the input state and the terminal output, so a line printed from the network
//! side ("erase input line, print, redraw input line") can never interleave with a key being
//! echoed. Keys are read on a dedicated thread because crossterm's reads block; they become
//! [`Input`] events on a tokio channel. The cursor position is never queried from the terminal
//! (no `ESC[6n`), so nothing can hang waiting for a reply the terminal does not send.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::{cursor, queue, style, terminal};
use tokio::sync::mpsc;
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

/// The client's own part of `/help`: the keys (the server then lists its commands).
pub const HELP: &[&str] = &[
    "keys: Enter send, Tab complete names and /commands, Up/Down history,",
    "      Left/Right/Home/End (Ctrl-B/F/A/E) move, Ctrl-Left/Right (Alt-B/F) move by word,",
    "      Ctrl-U/K/W delete to start/end/previous word, Ctrl-L redraw,",
    "      Ctrl-C clear the line, Ctrl-D on an empty line leave",
];

/// How many lines the history keeps.
const HISTORY_MAX: usize = 500;

/// Something the user did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A finished line.
    Line(String),
    /// End of input (Ctrl-D on an empty line, or the pipe ended).
    Eof,
}

/// The terminal while the client runs: raw mode, bracketed paste, the input line.
pub struct Terminal {
    state: Mutex<State>,
}

struct State {
    /// Standard output, unbuffered by std: every change is collected here and written with
    /// one `write` by `draw`, so the terminal never shows a half-updated screen (a printed
    /// line with the input line not yet redrawn under it).
    out: BufWriter<File>,
    prompt: String,
    buf: String,
    /// Byte offset into `buf`, always on a grapheme boundary.
    cursor: usize,
    /// Display column of `buf` shown first, when the line is wider than the terminal.
    scroll: usize,
    history: Vec<String>,
    /// Position while browsing the history, and the line that was being typed before.
    browsing: Option<(usize, String)>,
    /// Names offered by Tab.
    names: Vec<String>,
    cols: usize,
    /// Column the cursor was left at by the last draw.
    drawn_at: usize,
    finished: bool,
}

impl Terminal {
    /// Switches the terminal to raw mode and starts reading keys into `tx`.
    pub fn start(tx: mpsc::Sender<Input>) -> std::io::Result<Arc<Terminal>> {
        terminal::enable_raw_mode()?;
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A panic must not leave the user's shell in raw mode.
            let _ = terminal::disable_raw_mode();
            let _ = queue!(std::io::stdout(), event::DisableBracketedPaste);
            let _ = std::io::stdout().write_all(b"\r\n");
            let _ = std::io::stdout().flush();
            prev(info);
        }));
        let stdout = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
        let mut out = BufWriter::with_capacity(64 * 1024, stdout);
        let _ = queue!(out, event::EnableBracketedPaste);
        let cols = terminal::size().map_or(80, |(c, _)| usize::from(c.max(1)));
        let term = Arc::new(Terminal {
            state: Mutex::new(State {
                out,
                prompt: String::new(),
                buf: String::new(),
                cursor: 0,
                scroll: 0,
                history: Vec::new(),
                browsing: None,
                names: Vec::new(),
                cols,
                drawn_at: 0,
                finished: false,
            }),
        });
        term.lock().draw();
        let reader = term.clone();
        std::thread::spawn(move || {
            loop {
                let inputs = match event::read() {
                    Ok(ev) => reader.lock().handle(ev),
                    Err(_) => vec![Input::Eof],
                };
                let eof = inputs.contains(&Input::Eof);
                for i in inputs {
                    if tx.blocking_send(i).is_err() {
                        return;
                    }
                }
                if eof && reader.lock().finished {
                    return;
                }
            }
        });
        Ok(term)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Prints `text` (already sanitised and painted) above the input line, which is redrawn
    /// as it was.
    pub fn print_above(&self, text: &str, bell: bool) {
        let mut st = self.lock();
        if st.finished {
            return;
        }
        st.print_line(text);
        if bell {
            let _ = st.out.write_all(b"\x07");
        }
        st.draw();
    }

    /// Replaces the prompt in front of the input line.
    pub fn set_prompt(&self, prompt: &str) {
        let mut st = self.lock();
        st.prompt = prompt.to_owned();
        st.draw();
    }

    /// Drops `line` from the input history if it is the newest entry (answers to the address,
    /// port and name prompts are not chat lines worth recalling).
    pub fn forget_from_history(&self, line: &str) {
        let mut st = self.lock();
        if st.history.last().is_some_and(|l| l == line) {
            st.history.pop();
        }
    }

    /// Sets the names Tab completes.
    pub fn set_names<'a>(&self, names: impl Iterator<Item = &'a str>) {
        let mut st = self.lock();
        st.names.clear();
        st.names.extend(names.map(str::to_owned));
    }

    /// Leaves raw mode and clears the input line; later prints are dropped.
    pub fn finish(&self) {
        let mut st = self.lock();
        if st.finished {
            return;
        }
        st.finished = true;
        let _ = queue!(
            st.out,
            cursor::MoveToColumn(0),
            terminal::Clear(terminal::ClearType::CurrentLine),
            event::DisableBracketedPaste
        );
        let _ = st.out.flush();
        let _ = terminal::disable_raw_mode();
    }
}

impl State {
    /// Applies one terminal event; returns the inputs it completes.
    fn handle(&mut self, ev: Event) -> Vec<Input> {
        if self.finished {
            return Vec::new();
        }
        let mut done = Vec::new();
        match ev {
            Event::Key(key) if key.kind != KeyEventKind::Release => self.key(key, &mut done),
            Event::Paste(text) => self.paste(&text, &mut done),
            Event::Resize(cols, _) => {
                let cols = usize::from(cols.max(1));
                // A terminal that reflows (tmux, VTE, kitty, iTerm2, ...) has wrapped a wider
                // input line onto several rows, the cursor on the row its column fell to: go
                // to the first of them and clear from there, or the wrapped rows stay behind.
                let up = self.drawn_at / cols;
                let _ = queue!(self.out, cursor::MoveToColumn(0));
                if up > 0 {
                    let _ = queue!(
                        self.out,
                        cursor::MoveUp(u16::try_from(up).unwrap_or(u16::MAX))
                    );
                }
                let _ = queue!(
                    self.out,
                    terminal::Clear(terminal::ClearType::FromCursorDown)
                );
                self.cols = cols;
                // Show as much of the line as fits again; `draw` scrolls to the cursor.
                self.scroll = 0;
                self.draw();
            }
            _ => {}
        }
        done
    }

    fn key(&mut self, key: KeyEvent, done: &mut Vec<Input>) {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        match key.code {
            KeyCode::Enter => self.submit(done),
            KeyCode::Char('j' | 'm') if ctrl => self.submit(done),
            KeyCode::Char('d') if ctrl => {
                if self.buf.is_empty() {
                    done.push(Input::Eof);
                } else {
                    self.delete_forward();
                }
            }
            KeyCode::Char('c') if ctrl => {
                if self.buf.is_empty() {
                    self.note("(type /quit or press Ctrl-D on an empty line to leave)");
                } else {
                    self.set_buf(String::new());
                }
            }
            KeyCode::Backspace => self.delete_back(),
            KeyCode::Char('h') if ctrl => self.delete_back(),
            KeyCode::Delete => self.delete_forward(),
            KeyCode::Left if ctrl || alt => self.cursor = word_left(&self.buf, self.cursor),
            KeyCode::Right if ctrl || alt => self.cursor = word_right(&self.buf, self.cursor),
            KeyCode::Char('b') if alt => self.cursor = word_left(&self.buf, self.cursor),
            KeyCode::Char('f') if alt => self.cursor = word_right(&self.buf, self.cursor),
            KeyCode::Left => self.cursor = prev_boundary(&self.buf, self.cursor),
            KeyCode::Char('b') if ctrl => self.cursor = prev_boundary(&self.buf, self.cursor),
            KeyCode::Right => self.cursor = next_boundary(&self.buf, self.cursor),
            KeyCode::Char('f') if ctrl => self.cursor = next_boundary(&self.buf, self.cursor),
            KeyCode::Home => self.cursor = 0,
            KeyCode::Char('a') if ctrl => self.cursor = 0,
            KeyCode::End => self.cursor = self.buf.len(),
            KeyCode::Char('e') if ctrl => self.cursor = self.buf.len(),
            KeyCode::Char('u') if ctrl => {
                self.buf.drain(..self.cursor);
                self.cursor = 0;
            }
            KeyCode::Char('k') if ctrl => self.buf.truncate(self.cursor),
            KeyCode::Char('w') if ctrl => {
                let from = word_left(&self.buf, self.cursor);
                self.buf.drain(from..self.cursor);
                self.cursor = from;
            }
            KeyCode::Up => self.history_step(true),
            KeyCode::Char('p') if ctrl => self.history_step(true),
            KeyCode::Down => self.history_step(false),
            KeyCode::Char('n') if ctrl => self.history_step(false),
            KeyCode::Tab => self.complete(),
            KeyCode::Char('l') if ctrl => {
                let _ = queue!(
                    self.out,
                    terminal::Clear(terminal::ClearType::All),
                    cursor::MoveTo(0, 0)
                );
            }
            KeyCode::Char(c) if !ctrl && !alt => self.insert(&c.to_string()),
            _ => {}
        }
        self.draw();
    }

    fn submit(&mut self, done: &mut Vec<Input>) {
        let line = std::mem::take(&mut self.buf);
        self.cursor = 0;
        self.scroll = 0;
        self.browsing = None;
        if !line.trim().is_empty() && self.history.last() != Some(&line) {
            self.history.push(line.clone());
            if self.history.len() > HISTORY_MAX {
                self.history.remove(0);
            }
        }
        done.push(Input::Line(line));
    }

    /// A multi-line paste: every complete line is submitted on its own (the sender paces
    /// them), the unfinished tail stays in the input line for editing.
    fn paste(&mut self, text: &str, done: &mut Vec<Input>) {
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let mut parts = text.split('\n').peekable();
        while let Some(part) = parts.next() {
            let clean: String = part
                .chars()
                .map(|c| if c == '\t' { ' ' } else { c })
                .filter(|c| !c.is_control())
                .collect();
            self.insert(&clean);
            if parts.peek().is_some() {
                self.submit(done);
            }
        }
        self.draw();
    }

    fn insert(&mut self, s: &str) {
        self.buf.insert_str(self.cursor, s);
        self.cursor += s.len();
    }

    fn set_buf(&mut self, s: String) {
        self.buf = s;
        self.cursor = self.buf.len();
    }

    fn delete_back(&mut self) {
        let from = prev_boundary(&self.buf, self.cursor);
        self.buf.drain(from..self.cursor);
        self.cursor = from;
    }

    fn delete_forward(&mut self) {
        let to = next_boundary(&self.buf, self.cursor);
        self.buf.drain(self.cursor..to);
    }

    fn history_step(&mut self, older: bool) {
        let len = self.history.len();
        let next = match (&self.browsing, older) {
            (None, true) if len > 0 => Some(len - 1),
            (None, _) => return,
            (Some((i, _)), true) => Some(i.saturating_sub(1)),
            (Some((i, _)), false) if i + 1 < len => Some(i + 1),
            (Some(_), false) => None,
        };
        match next {
            Some(i) => {
                let saved = match self.browsing.take() {
                    Some((_, saved)) => saved,
                    None => self.buf.clone(),
                };
                let line = self.history.get(i).cloned().unwrap_or_default();
                self.browsing = Some((i, saved));
                self.set_buf(line);
            }
            None => {
                let saved = self.browsing.take().map(|(_, s)| s).unwrap_or_default();
                self.set_buf(saved);
            }
        }
    }

    fn complete(&mut self) {
        let done = complete(&self.buf, self.cursor, &self.names);
        if let Some((start, replacement)) = done.replace {
            self.buf.replace_range(start..self.cursor, &replacement);
            self.cursor = start + replacement.len();
        }
        if done.candidates.len() > 1 {
            let list = done.candidates.join("  ");
            self.note(&list);
        }
    }

    /// Prints a line of the editor's own above the input line.
    fn note(&mut self, text: &str) {
        self.print_line(&chat_proto::protocol::sanitize(text));
    }

    /// Replaces the input line on screen with `text` and moves below it; the caller redraws
    /// the input line.
    fn print_line(&mut self, text: &str) {
        let _ = queue!(
            self.out,
            cursor::MoveToColumn(0),
            terminal::Clear(terminal::ClearType::CurrentLine),
            style::Print(text),
            style::Print("\r\n")
        );
    }

    /// Redraws the input line, scrolled so the cursor is visible.
    fn draw(&mut self) {
        if self.finished {
            return;
        }
        let prompt_w = self.prompt.width();
        // Keep the last column free so the cursor never sits in the terminal's wrap position.
        let avail = self.cols.saturating_sub(prompt_w + 1).max(1);
        let (visible, scroll, x) = view(&self.buf, self.cursor, self.scroll, avail);
        self.scroll = scroll;
        let at = prompt_w + x;
        self.drawn_at = at;
        let _ = queue!(
            self.out,
            cursor::MoveToColumn(0),
            terminal::Clear(terminal::ClearType::CurrentLine),
            style::Print(&self.prompt),
            style::Print(visible),
            cursor::MoveToColumn(u16::try_from(at).unwrap_or(u16::MAX))
        );
        let _ = self.out.flush();
    }
}

/// The part of `buf` shown in `avail` columns, scrolled (from `scroll`, the first column shown
/// last time) only as far as needed to keep the cursor at byte `cursor` in view. Returns the
/// text to print, the new scroll and the cursor's column within the text. A wide character cut
/// by the left edge is replaced by blanks, so every later character stays in its column.
fn view(buf: &str, cursor: usize, scroll: usize, avail: usize) -> (String, usize, usize) {
    let cursor_col = buf[..cursor].width();
    let scroll = if cursor_col < scroll {
        cursor_col
    } else if cursor_col > scroll + avail {
        cursor_col - avail
    } else {
        scroll
    };
    let mut visible = String::new();
    let mut col = 0;
    for g in buf.graphemes(true) {
        let w = g.width();
        if col < scroll && col + w > scroll {
            visible.push_str(&" ".repeat((col + w - scroll).min(avail)));
        } else if col >= scroll && col + w <= scroll + avail {
            visible.push_str(g);
        }
        col += w;
    }
    (visible, scroll, cursor_col - scroll)
}

/// What Tab does to a line.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    /// Replace from this byte offset up to the cursor with this text.
    pub replace: Option<(usize, String)>,
    /// Every candidate, shown when there are several.
    pub candidates: Vec<String>,
}

/// Completes the word before `cursor`: a command at the start of the line, else a name. A
/// single name at the start of the line gets ": " (addressing someone), elsewhere a space.
pub fn complete(buf: &str, cursor: usize, names: &[String]) -> Completion {
    let head = &buf[..cursor];
    let start = head.rfind(' ').map_or(0, |i| i + 1);
    let word = &head[start..];
    let lower = word.to_lowercase();
    let is_command = start == 0 && word.starts_with('/');
    let candidates: Vec<String> = if is_command {
        // Offered from the protocol's own list, so every command the server knows is here.
        chat_proto::command::COMMANDS
            .iter()
            .map(|c| c.name)
            .filter(|c| c.starts_with(&lower))
            .map(str::to_owned)
            .collect()
    } else if word.is_empty() {
        Vec::new()
    } else {
        names
            .iter()
            .filter(|n| n.to_lowercase().starts_with(&lower))
            .cloned()
            .collect()
    };
    let replace = match candidates.as_slice() {
        [] => None,
        [one] => {
            let suffix = if start == 0 && !is_command { ": " } else { " " };
            Some((start, format!("{one}{suffix}")))
        }
        many => {
            let prefix = common_prefix(many);
            (prefix.chars().count() > word.chars().count()).then_some((start, prefix))
        }
    };
    Completion {
        replace,
        candidates,
    }
}

/// The longest case-insensitive common prefix, in the first candidate's spelling.
fn common_prefix(words: &[String]) -> String {
    let Some(first) = words.first() else {
        return String::new();
    };
    let mut len = first.chars().count();
    for w in &words[1..] {
        len = first
            .chars()
            .zip(w.chars())
            .take(len)
            .take_while(|(a, b)| a.to_lowercase().eq(b.to_lowercase()))
            .count();
    }
    first.chars().take(len).collect()
}

fn prev_boundary(s: &str, at: usize) -> usize {
    s[..at]
        .grapheme_indices(true)
        .next_back()
        .map_or(0, |(i, _)| i)
}

fn next_boundary(s: &str, at: usize) -> usize {
    s[at..].graphemes(true).next().map_or(at, |g| at + g.len())
}

fn word_left(s: &str, at: usize) -> usize {
    let head = s[..at].trim_end();
    head.rfind(' ').map_or(0, |i| i + 1)
}

fn word_right(s: &str, at: usize) -> usize {
    let tail = &s[at..];
    let skipped = tail.len() - tail.trim_start().len();
    let rest = &tail[skipped..];
    at + skipped + rest.find(' ').unwrap_or(rest.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["alice", "Albert", "bob"].map(String::from).to_vec()
    }

    #[test]
    fn completes_names_and_commands() {
        let c = complete("bo", 2, &names());
        assert_eq!(c.replace, Some((0, "bob: ".into())));
        let c = complete("hi B", 4, &names());
        assert_eq!(c.replace, Some((3, "bob ".into())));
        let c = complete("al", 2, &names());
        assert_eq!(c.candidates.len(), 2);
        assert_eq!(c.replace, None);
        let c = complete("ali", 3, &names());
        assert_eq!(c.replace, Some((0, "alice: ".into())));
        let c = complete("/ni", 3, &names());
        assert_eq!(c.replace, Some((0, "/nick ".into())));
        let c = complete("/m", 2, &names());
        assert_eq!(c.candidates, vec!["/me", "/msg"]);
        let c = complete("/t", 2, &names());
        assert_eq!(c.replace, Some((0, "/token ".into())));
        let c = complete("/msg a", 6, &names());
        assert_eq!(c.candidates.len(), 2);
    }

    #[test]
    fn view_scrolls_to_the_cursor_and_keeps_wide_characters_in_their_columns() {
        // Fits: nothing scrolls.
        assert_eq!(view("héllo", 3, 0, 10), ("héllo".into(), 0, 2));
        // Cursor past the right edge: scroll just enough.
        let s = "abcdefghij";
        assert_eq!(view(s, 10, 0, 4), ("ghij".into(), 6, 4));
        // Cursor left of the view: scroll back to it.
        assert_eq!(view(s, 2, 6, 4), ("cdef".into(), 2, 0));
        // A two-column character cut by the left edge becomes a blank, so "c" stays in the
        // column under which the cursor is drawn.
        let s = "日本c";
        assert_eq!(view(s, s.len(), 0, 2), (" c".into(), 3, 2));
        assert_eq!(view(s, s.len(), 1, 4), (" 本c".into(), 1, 4));
        // Combining marks take no column of their own.
        let s = "e\u{301}e\u{301}x";
        assert_eq!(view(s, s.len(), 0, 10).2, 3);
    }

    #[test]
    fn moves_by_grapheme_and_word() {
        let s = "e\u{301}x 日本";
        assert_eq!(next_boundary(s, 0), 3);
        assert_eq!(prev_boundary(s, 3), 0);
        assert_eq!(word_left(s, s.len()), 5);
        assert_eq!(word_right(s, 0), 4);
    }
}
