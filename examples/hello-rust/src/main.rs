//! A tiny HTTP/1.1 server using only the standard library, so that the
//! example builds in a second without fetching anything.
//!
//! `GET /` answers with a greeting naming the app version, `GET /healthz`
//! with `ok`. It listens on `$PORT` (default 8000), as Stead expects.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

const MESSAGE: &str = "Hello from Stead";

fn main() {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8000".into());
    let listener = match TcpListener::bind(("0.0.0.0", port.parse::<u16>().unwrap_or(8000))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("hello listening on port {port}");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve(conn);
        });
    }
}

fn serve(conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let (status, text) = match path {
            "/healthz" => ("200 OK", "ok\n".to_string()),
            "/" => (
                "200 OK",
                format!(
                    "{MESSAGE} (app {}, version {}, instance {})\n",
                    std::env::var("STEAD_APP").unwrap_or_default(),
                    std::env::var("STEAD_VERSION").unwrap_or_default(),
                    std::env::var("STEAD_INSTANCE").unwrap_or_default()
                ),
            ),
            "/env" => (
                "200 OK",
                format!("GREETING={}\n", std::env::var("GREETING").unwrap_or_default()),
            ),
            _ => ("404 Not Found", "not found\n".to_string()),
        };
        // One write per response: several small writes would each wait
        // for the previous one's ACK (Nagle), which the peer may delay.
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        out.write_all(response.as_bytes())?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}
