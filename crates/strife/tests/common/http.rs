//! The dashboard over plain HTTP/1.1, as the tests speak to it: one
//! exchange, a login link's parts, and logging in with it.

use super::WAIT;
use std::io::{Read, Write};

/// One HTTP/1.1 exchange: `(status, headers in lower case, body)`.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect to the dashboard");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    tcp.write_all(req.as_bytes()).expect("request");
    let mut text = String::new();
    tcp.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// `(address, path and query)` of a login link.
pub fn split_link(link: &str) -> (String, String) {
    let rest = link.strip_prefix("http://").expect("a plain HTTP link on loopback");
    let (addr, path) = rest.split_once('/').expect("a path");
    (addr.to_owned(), format!("/{path}"))
}

/// Logs in with `link`; the session cookie (`name=value`).
pub fn log_in(link: &str) -> String {
    let (addr, path) = split_link(link);
    let (status, head, _) = http(&addr, "GET", &path, &[], "");
    assert_eq!(status, 303, "a good link logs in: {head}");
    assert!(
        head.contains("httponly") && head.contains("samesite=strict") && head.contains("path=/"),
        "{head}"
    );
    head.lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned()
}
