//! Headless Chromium for the browser tests (tests/browser.rs), driven through chromedriver's
//! WebDriver interface by `fantoccini`.
//!
//! [`Browser::start`] spawns `chromedriver --port=0` in its own process group and reads the
//! port it reports (no port race; a start that loses chromedriver's own IPv4/IPv6 race is
//! retried); dropping the [`Browser`] kills the whole group, which takes
//! the Chromium processes chromedriver started with it. Each [`Browser::page`] is one Chromium
//! session (a user: its own cookies and sessionStorage). The tests are async inside
//! [`Browser::run`]; every wait is bounded by [`WAIT`].

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as WebDriver, ClientBuilder, Locator, key::Key};
use serde_json::{Value, json};

use super::components::{program_path, require};
use super::wait::WAIT;

/// How often a page condition is looked at again.
const POLL: Duration = Duration::from_millis(50);

/// chromedriver and the Chromiums it started; all killed on drop.
pub struct Browser {
    driver: Child,
    /// chromedriver's WebDriver endpoint, `http://127.0.0.1:PORT`.
    endpoint: String,
    chromium: PathBuf,
    runtime: tokio::runtime::Runtime,
}

/// The window a page gets.
#[derive(Clone, Copy, Debug)]
pub enum View {
    /// A desktop window of this many CSS pixels.
    Desktop(u32, u32),
    /// A phone (375 x 812 CSS pixels at 2x, touch), by Chromium's mobile emulation.
    Phone,
    /// A desktop window of this many CSS pixels on a system set to dark (`--force-dark-mode`:
    /// `prefers-color-scheme: dark`).
    Dark(u32, u32),
}

impl Browser {
    /// Starts chromedriver; `None` (the test returns: a skip, or a failure under CI) when
    /// Chromium or chromedriver is not installed.
    pub fn start() -> Option<Browser> {
        if !require("chromium", "apt-get install chromium")
            || !require("chromedriver", "apt-get install chromium-driver")
        {
            return None;
        }
        let chromium = program_path("chromium").expect("require found chromium");
        let chromedriver = program_path("chromedriver").expect("require found chromedriver");
        // chromedriver binds port 0 on IPv6 and then the same port on IPv4; when an IPv4
        // socket already uses that number it says "IPv4 port not available" and exits. On a
        // busy machine that happens often, so a start that ends without a port is retried.
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let (driver, outcome) = spawn_driver(&chromedriver);
            let mut driver = KillOnDrop(Some(driver));
            match outcome {
                Ok(port) => {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime for the WebDriver client");
                    return Some(Browser {
                        driver: driver.0.take().expect("just spawned"),
                        endpoint: format!("http://127.0.0.1:{port}"),
                        chromium,
                        runtime,
                    });
                }
                Err(output) => last = output,
            }
        }
        panic!("chromedriver did not start in {START_ATTEMPTS} attempts; the last said:\n{last}");
    }

    /// Runs a test's async body to its end.
    pub fn run<T>(&self, body: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(body)
    }

    /// A new Chromium session (one user) showing `url`.
    pub async fn page(&self, url: &str, view: View) -> Page {
        let mut options = json!({
            "binary": self.chromium,
            // --no-sandbox: the tests may run as root, where Chromium's sandbox refuses to start.
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-first-run", "--lang=en-US"],
        });
        match view {
            View::Desktop(w, h) | View::Dark(w, h) => {
                let args = options["args"].as_array_mut().expect("args");
                args.push(json!(format!("--window-size={w},{h}")));
                if matches!(view, View::Dark(..)) {
                    args.push(json!("--force-dark-mode"));
                }
            }
            View::Phone => {
                options["mobileEmulation"] = json!({
                    "deviceMetrics": {"width": 375, "height": 812, "pixelRatio": 2.0,
                                      "mobile": true, "touch": true}
                });
            }
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            WAIT * 3,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&self.endpoint),
        )
        .await
        .unwrap_or_else(|_| panic!("no Chromium session within {:?}", WAIT * 3))
        .unwrap_or_else(|e| panic!("starting a Chromium session: {e}"));
        let page = Page { wd: client };
        page.goto(url).await;
        page
    }
}

/// How often [`Browser::start`] tries to start chromedriver.
const START_ATTEMPTS: usize = 10;

/// Spawns `chromedriver --port=0` in its own process group (so that drop can kill it and
/// every Chromium it starts at once) and waits for the port it reports; `Err` holds its output
/// when it exits without one. Panics when it neither reports nor exits within [`WAIT`].
fn spawn_driver(chromedriver: &std::path::Path) -> (Child, Result<u16, String>) {
    let mut driver = Command::new(chromedriver)
        .arg("--port=0")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromedriver");
    let stdout = driver.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the port, then keeps draining so chromedriver never blocks on a full pipe; at the
    // end of its output, says so with everything it printed.
    std::thread::spawn(move || {
        let mut said = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(port) = started_on(&line) {
                let _ = tx.send(Ok(port));
            }
            said.push_str(&line);
            said.push('\n');
        }
        let _ = tx.send(Err(said));
    });
    match rx.recv_timeout(WAIT) {
        Ok(outcome) => (driver, outcome),
        Err(_) => {
            kill_group(&mut driver);
            panic!("chromedriver did not report its port within {WAIT:?}");
        }
    }
}

/// Kills `child`'s process group (chromedriver and the Chromiums it started) and reaps it.
fn kill_group(child: &mut Child) {
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// A chromedriver killed with its group when dropped, unless taken.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            kill_group(&mut child);
        }
    }
}

/// The port in chromedriver's "ChromeDriver was started successfully on port N." line.
fn started_on(line: &str) -> Option<u16> {
    let rest = line.split("started successfully on port ").nth(1)?;
    rest.trim_end_matches(['.', ' ', '\r']).parse().ok()
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

/// One browser tab showing the chat page, with the few things the tests do to it.
pub struct Page {
    pub wd: WebDriver,
}

impl Page {
    /// Opens `url` (bounded).
    pub async fn goto(&self, url: &str) {
        tokio::time::timeout(WAIT, self.wd.goto(url))
            .await
            .unwrap_or_else(|_| panic!("loading {url} took over {WAIT:?}"))
            .unwrap_or_else(|e| panic!("loading {url}: {e}"));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn js(&self, script: &str) -> Value {
        tokio::time::timeout(WAIT, self.wd.execute(script, Vec::new()))
            .await
            .unwrap_or_else(|_| panic!("script took over {WAIT:?}: {script}"))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` until it returns something other than null/false/""; returns it. On
    /// timeout, panics with `what` and what the page shows.
    pub async fn wait_js(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if !matches!(&v, Value::Null | Value::Bool(false))
                && v.as_str().is_none_or(|s| !s.is_empty())
            {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {WAIT:?} waiting for {what}\npage: {}",
                    self.describe().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Types `text` into the element `css` (WebDriver key events, as a user would).
    pub async fn type_into(&self, css: &str, text: &str) {
        let el = tokio::time::timeout(WAIT, self.wd.find(Locator::Css(css)))
            .await
            .unwrap_or_else(|_| panic!("finding {css} took over {WAIT:?}"))
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"));
        tokio::time::timeout(WAIT, el.send_keys(text))
            .await
            .unwrap_or_else(|_| panic!("typing into {css} took over {WAIT:?}"))
            .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// Types a line into the message box and presses Enter.
    pub async fn say(&self, line: &str) {
        self.type_into("#input", &format!("{line}{}", &*Key::Enter))
            .await;
    }

    /// Types `name` at the name prompt and presses Enter (the field is cleared first).
    pub async fn try_name(&self, name: &str) {
        self.js("document.getElementById('name-input').value = ''; return true;")
            .await;
        self.type_into("#name-input", &format!("{name}{}", &*Key::Enter))
            .await;
    }

    /// Takes `name` and waits until the room shows.
    pub async fn join(&self, name: &str) {
        self.try_name(name).await;
        self.wait_js(
            &format!("the page to join as {name}"),
            &format!(
                "return chatdPage.phase() === 'chatting' && chatdPage.name() === {};",
                json!(name)
            ),
        )
        .await;
    }

    /// The page's state: `chatdPage.phase()`.
    pub async fn phase(&self) -> String {
        self.js("return chatdPage.phase();")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The messages shown (chat lines and actions, not replayed history), in the protocol's
    /// own shape (`name: text`, `* name action`), in screen order.
    pub async fn messages(&self) -> Vec<String> {
        strings(
            self.js(
                "return [...document.querySelectorAll('#messages li.chat, #messages li.action')] \
                   .filter(li => !li.classList.contains('history')) \
                   .map(li => [...li.childNodes].slice(2).map(n => n.textContent).join(''));",
            )
            .await,
        )
    }

    /// Waits until the page shows `n` messages (see [`Page::messages`]); returns them.
    pub async fn wait_messages(&self, n: usize) -> Vec<String> {
        self.wait_js(
            &format!("{n} messages"),
            &format!(
                "return document.querySelectorAll('#messages li.chat:not(.history), \
                 #messages li.action:not(.history)').length >= {n};"
            ),
        )
        .await;
        self.messages().await
    }

    /// Every log line's text (time included), for failure messages.
    pub async fn log_text(&self) -> Vec<String> {
        strings(
            self.js("return [...document.querySelectorAll('#messages li')] \
                   .map(li => li.className + ' | ' + li.textContent);")
                .await,
        )
    }

    /// The names in the online list.
    pub async fn people(&self) -> Vec<String> {
        strings(
            self.js(
                "return [...document.querySelectorAll('#people .person')].map(b => b.dataset.name);",
            )
            .await,
        )
    }

    /// What the page shows, for failure messages: phase, status, banner, name error, log.
    pub async fn describe(&self) -> String {
        let v = self
            .wd
            .execute(
                "return {phase: window.chatdPage ? chatdPage.phase() : 'no script', \
                  status: document.getElementById('status').textContent, \
                  banner: document.getElementById('ended').hidden ? null \
                          : document.getElementById('ended-text').textContent, \
                  nameError: document.getElementById('name-error').textContent, \
                  log: [...document.querySelectorAll('#messages li')].slice(-30) \
                         .map(li => li.className + ' | ' + li.textContent)};",
                Vec::new(),
            )
            .await;
        match v {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(e) => format!("(page not readable: {e})"),
        }
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        tokio::time::timeout(WAIT, self.wd.screenshot())
            .await
            .unwrap_or_else(|_| panic!("screenshot took over {WAIT:?}"))
            .unwrap_or_else(|e| panic!("screenshot: {e}"))
    }

    /// Ends the session (its Chromium exits).
    pub async fn close(self) {
        let _ = tokio::time::timeout(WAIT, self.wd.close()).await;
    }
}

/// A JSON array of strings as a Vec (anything else: empty).
fn strings(v: Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_chromedrivers_port() {
        assert_eq!(
            super::started_on("ChromeDriver was started successfully on port 42923."),
            Some(42923)
        );
        assert_eq!(
            super::started_on("Only local connections are allowed."),
            None
        );
    }
}
