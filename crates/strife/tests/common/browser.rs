//! A headless Chromium for the tests, driven over the W3C WebDriver
//! protocol through Debian's `chromedriver` (packages `chromium` and
//! `chromium-driver`, which `scripts/test` installs).
//!
//! The protocol is JSON over HTTP on 127.0.0.1; the handful of commands the
//! tests use (new session, navigate, find, text, click, type, run a script,
//! screenshot) are written here over a plain HTTP/1.1 exchange. The
//! WebDriver crates (fantoccini's `webdriver`) would bring a second `http`,
//! `cookie` and `base64` and ICU's data into the build for that.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to install when the browser or its driver is missing.
pub const INSTALL: &str = "apt-get install -y chromium chromium-driver";
/// The key of an element reference in WebDriver's answers.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest a WebDriver command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn find(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{program}` is not installed; the browser tests need it: {INSTALL}"))
}

/// A chromedriver process and one browser session.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: super::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port of 127.0.0.1 and a headless
    /// Chromium session with an empty profile, a `width`×`height` window.
    pub fn start(width: u32, height: u32) -> Browser {
        let chromium = find("chromium");
        let driver_path = find("chromedriver");
        let mut driver = Command::new(driver_path)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let out = driver.stdout.take().expect("stdout");
        let mut lines = BufReader::new(out).lines();
        let deadline = Instant::now() + super::WAIT;
        let port = loop {
            assert!(Instant::now() < deadline, "chromedriver never said its port");
            let line = lines.next().expect("chromedriver exited").expect("chromedriver's output");
            if let Some(rest) = line.split_once("started successfully on port ").map(|(_, r)| r) {
                break rest.trim_end_matches('.').trim().parse::<u16>().expect("a port");
            }
        };
        // Keep reading its output so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let profile = super::TempDir::new("chromium-profile");
        // The flags Chromium needs here: headless as root (no sandbox),
        // and none of its background traffic (this machine's network is
        // closed; refused connections would slow it down).
        let args = json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.0.display()),
        ]);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium.to_string_lossy(), "args": args},
        }}});
        let answer = command(port, "POST", "/session", &caps);
        let session =
            answer["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}")).to_owned();
        Browser { driver, port, session, _profile: profile }
    }

    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        command(self.port, method, &format!("/session/{}{path}", self.session), body)
    }

    /// Opens `url` and waits for its load.
    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", &json!({ "url": url }));
    }

    /// The current page's URL.
    pub fn url(&self) -> String {
        self.call("GET", "/url", &Value::Null).as_str().unwrap_or_default().to_owned()
    }

    /// The first element matching `css`, if there is one now.
    pub fn find(&self, css: &str) -> Option<String> {
        let found = self.call("POST", "/elements", &json!({"using": "css selector", "value": css}));
        found.as_array()?.first()?[ELEMENT_KEY].as_str().map(str::to_owned)
    }

    /// Waits (bounded) until an element matching `css` exists; its id.
    pub fn wait_for(&self, css: &str) -> String {
        let deadline = Instant::now() + super::WAIT;
        loop {
            if let Some(e) = self.find(css) {
                return e;
            }
            assert!(Instant::now() < deadline, "no {css} on {}", self.url());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The text of the element matching `css` (waiting for it).
    pub fn text(&self, css: &str) -> String {
        let e = self.wait_for(css);
        self.call("GET", &format!("/element/{e}/text"), &Value::Null).as_str().unwrap_or_default().to_owned()
    }

    /// Waits (bounded) until the text of `css` satisfies `pred`; that text.
    pub fn wait_text(&self, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + super::WAIT;
        loop {
            let text = self.find(css).map(|_| self.text(css)).unwrap_or_default();
            if pred(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed {what}; it says {text:?} on {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the element matching `css`.
    pub fn click(&self, css: &str) {
        let e = self.wait_for(css);
        self.call("POST", &format!("/element/{e}/click"), &json!({}));
    }

    /// Types `text` into the element matching `css`.
    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.wait_for(css);
        self.call("POST", &format!("/element/{e}/value"), &json!({ "text": text }));
    }

    /// Runs `script` in the page; what it returns.
    pub fn run(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", &json!({"script": script, "args": []}))
    }

    /// A PNG of the window, written to `path`.
    pub fn screenshot(&self, path: &Path) {
        let data = self.call("GET", "/screenshot", &Value::Null);
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let png = super::decode_base64(data.as_str().expect("a screenshot"), alphabet);
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("writing the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            command(self.port, "DELETE", &format!("/session/{}", self.session), &Value::Null)
        });
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One WebDriver command: `method path` with `body` (JSON), its `value`.
/// A WebDriver error fails the test with its message.
fn command(port: u16, method: &str, path: &str, body: &Value) -> Value {
    let body = if body.is_null() { String::new() } else { body.to_string() };
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connecting to chromedriver");
    tcp.set_read_timeout(Some(COMMAND_TIMEOUT)).expect("timeout");
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("sending to chromedriver");
    // The answer's head, then a body of its Content-Length (chromedriver
    // keeps the connection open) or, chunked, up to the last chunk.
    let mut reader = BufReader::new(tcp);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("chromedriver's answer");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok());
    let payload = match length {
        Some(n) => {
            let mut body = vec![0; n];
            reader.read_exact(&mut body).expect("chromedriver's answer");
            String::from_utf8_lossy(&body).into_owned()
        }
        None => {
            let mut rest = String::new();
            reader.read_to_string(&mut rest).expect("chromedriver's answer");
            if head.contains("transfer-encoding: chunked") { dechunk(&rest) } else { rest }
        }
    };
    let answer: Value =
        serde_json::from_str(&payload).unwrap_or_else(|e| panic!("not JSON ({e}): {payload}"));
    let value = answer["value"].clone();
    if value.get("error").is_some() {
        panic!("WebDriver {method} {path}: {} ({})", value["error"], value["message"]);
    }
    value
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n.min(after.len())]);
        rest = after.get(n + 2..).unwrap_or("");
    }
    out
}
