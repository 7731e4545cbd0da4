//! `quantfleet fetch` against a loopback HTTP server: download with digest check, redirects, refusal of a
//! wrong digest, an HTTP error or a truncated body (nothing left behind), and no re-download when present.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use quantfleet_testsupport::ScratchDir;

/// Synthetic payload (not a real checkpoint): 300 KiB of a repeating pattern.
fn payload() -> Vec<u8> {
    (0..300 * 1024u32).map(|i| (i * 31 % 251) as u8).collect()
}

/// Serves a fixed set of paths until the process exits; returns the base URL.
fn serve() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut buf = [0u8; 2048];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let body = payload();
            let _ = match path.as_str() {
                "/model.gguf" => stream
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len())
                            .as_bytes(),
                    )
                    .and_then(|_| stream.write_all(&body)),
                "/moved" => stream.write_all(
                    b"HTTP/1.1 302 Found\r\nlocation: /model.gguf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                ),
                "/short" => stream
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len())
                            .as_bytes(),
                    )
                    .and_then(|_| stream.write_all(&body[..1000])),
                _ => stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
            };
        }
    });
    base
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn fetch(uri: &str, out: &Path, sha: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quantfleet"));
    cmd.args(["fetch", "--uri", uri, "--out", out.to_str().unwrap()]);
    if let Some(sha) = sha {
        cmd.args(["--sha256", sha]);
    }
    let o = cmd.output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Where to download `name`: in a scratch directory of the test's own, removed when the guard drops.
fn out_path(name: &str) -> (ScratchDir, PathBuf) {
    let dir = ScratchDir::new("quantfleet-fetch").unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

#[test]
fn downloads_verifies_and_follows_redirects() {
    let base = serve();
    let sha = sha256_hex(&payload());
    let (_dir, out) = out_path("a.gguf");
    let (ok, log) = fetch(&format!("{base}/moved"), &out, Some(&sha));
    assert!(ok, "{log}");
    assert_eq!(std::fs::read(&out).unwrap(), payload());
    // Present with the right digest: kept, not downloaded again (the server is not even needed).
    let (ok, log) = fetch("http://127.0.0.1:1/model.gguf", &out, Some(&sha));
    assert!(ok && log.contains("already present"), "{log}");
}

#[test]
fn refuses_a_wrong_digest_an_http_error_and_a_truncated_body() {
    let base = serve();
    let wrong = "0".repeat(64);
    let (_dir, out) = out_path("b.gguf");
    let (ok, log) = fetch(&format!("{base}/model.gguf"), &out, Some(&wrong));
    assert!(!ok && log.contains("sha256 mismatch"), "{log}");
    let (ok, log) = fetch(&format!("{base}/missing"), &out, Some(&wrong));
    assert!(!ok && log.contains("404"), "{log}");
    let (ok, log) = fetch(&format!("{base}/short"), &out, Some(&sha256_hex(&payload())));
    assert!(!ok, "{log}");
    assert!(!out.exists() && !out.with_extension("partial").exists(), "nothing may be left behind");
    let (ok, log) = fetch(&format!("{base}/model.gguf"), &out, Some("not-hex"));
    assert!(!ok && log.contains("64 lower-case hex digits"), "{log}");
}
