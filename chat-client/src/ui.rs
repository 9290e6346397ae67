//! Where the user's lines come from and where shown lines go: either plain standard streams
//! (pipes, scripts) or the interactive line editor on a terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use chat_proto::protocol::Event;
use tokio::sync::mpsc;

pub use crate::editor::Input;
use crate::editor::Terminal;
use crate::render::{Renderer, Shown};

/// The user's side: input events and the output.
pub struct Ui {
    /// Formats lines for this output.
    pub renderer: Renderer,
    /// Whether the user can be asked questions (standard input is a terminal).
    pub interactive: bool,
    /// The line editor, when both standard input and output are terminals.
    term: Option<Arc<Terminal>>,
    input: mpsc::Receiver<Input>,
}

impl Ui {
    /// Sets up the output for this process's standard streams.
    pub fn new(color_allowed: bool, ui: crate::config::UiSection) -> std::io::Result<Ui> {
        let interactive = std::io::stdin().is_terminal();
        let editor = interactive && std::io::stdout().is_terminal();
        let no_color_env = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let renderer = Renderer {
            pretty: editor,
            color: editor && color_allowed && ui.color && !no_color_env,
            ui,
            me: String::new(),
        };
        let (tx, input) = mpsc::channel(64);
        let term = if editor {
            Some(Terminal::start(tx)?)
        } else {
            spawn_stdin_reader(tx);
            None
        };
        Ok(Ui {
            renderer,
            interactive,
            term,
            input,
        })
    }

    /// Whether lines go through the line editor.
    pub fn is_editor(&self) -> bool {
        self.term.is_some()
    }

    /// The line editor, if any.
    pub fn terminal(&self) -> Option<&Arc<Terminal>> {
        self.term.as_ref()
    }

    /// The next thing the user did; `Eof` forever once input has ended.
    pub async fn next(&mut self) -> Input {
        self.input.recv().await.unwrap_or(Input::Eof)
    }

    /// Shows a formatted line.
    pub fn show(&self, shown: &Shown) {
        let text = self.renderer.paint(shown);
        let bell = shown.bell && self.renderer.ui.bell && self.is_editor();
        match &self.term {
            Some(t) => t.print_above(&text, bell),
            None => {
                let mut out = std::io::stdout().lock();
                // A closed stdout (reader went away) is not worth dying over mid-chat.
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }

    /// Shows a line received from the server; `event` is `line` parsed.
    pub fn show_incoming(&self, line: &str, event: &Event<'_>) {
        self.show(&self.renderer.incoming(line, event));
    }

    /// Tells the user about the connection or a mistake: on a terminal among the chat, in pipe
    /// mode on standard error so standard output keeps only what the server sent.
    pub fn status(&self, text: &str) {
        if self.is_editor() {
            self.show(&self.renderer.status(text));
        } else {
            // Never eprintln!: it panics when stderr is gone.
            let _ = writeln!(
                std::io::stderr(),
                "chat-client: {}",
                chat_proto::protocol::sanitize(text)
            );
        }
    }

    /// Asks a question with a default answer; `None` when input ended.
    pub async fn ask(&mut self, question: &str, default: Option<&str>) -> Option<String> {
        let prompt = match default {
            Some(d) if !d.is_empty() => format!("{question} [{d}]: "),
            _ => format!("{question}: "),
        };
        match &self.term {
            Some(t) => t.set_prompt(&prompt),
            None => {
                let mut err = std::io::stderr();
                let _ = write!(err, "{prompt}");
                let _ = err.flush();
            }
        }
        let raw = match self.next().await {
            Input::Line(l) => l,
            Input::Eof => return None,
        };
        let answer = raw.trim().to_owned();
        if let Some(t) = &self.term {
            t.forget_from_history(&raw);
            t.set_prompt("");
        }
        Some(match default {
            Some(d) if answer.is_empty() => d.to_owned(),
            _ => answer,
        })
    }

    /// Who we are chatting as: our own lines are shown as ours, and the prompt names us.
    pub fn set_name(&mut self, name: &str) {
        self.renderer.me = name.to_owned();
        self.set_prompt(&format!("{name}> "));
    }

    /// Sets the input line's prompt (editor only).
    pub fn set_prompt(&self, prompt: &str) {
        if let Some(t) = &self.term {
            t.set_prompt(prompt);
        }
    }

    /// Gives the terminal back as it was found.
    pub fn finish(&self) {
        if let Some(t) = &self.term {
            t.finish();
        }
    }
}

/// Reads standard input line by line on its own thread (blocking reads cannot be cancelled,
/// so they must not sit in the async runtime).
fn spawn_stdin_reader(tx: mpsc::Sender<Input>) {
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match lock.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while matches!(buf.last(), Some(b'\n' | b'\r')) {
                        buf.pop();
                    }
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    if tx.blocking_send(Input::Line(line)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.blocking_send(Input::Eof);
    });
}
