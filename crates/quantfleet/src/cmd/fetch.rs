//! `quantfleet fetch`: downloads a checkpoint for a node pod (the init container of an `https://` model source)
//! and refuses a file whose SHA-256 differs from the declared one. The download goes to `OUT.partial` and is
//! renamed only after the digest matched, so a node never sees a truncated or wrong file; an `OUT` that
//! already has the right digest (a restarted pod) is kept without downloading again.

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const MAX_REDIRECTS: usize = 5;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// http:// or https:// URL of the checkpoint.
    #[arg(long)]
    uri: String,
    /// Where to write it.
    #[arg(long)]
    out: PathBuf,
    /// Expected lower-case hex SHA-256 of the file.
    #[arg(long)]
    sha256: Option<String>,
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(want) = &args.sha256
        && (want.len() != 64 || !want.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        bail!("--sha256 {want:?} is not 64 lower-case hex digits");
    }
    if let (Some(want), true) = (&args.sha256, args.out.exists())
        && file_sha256(&args.out)? == *want
    {
        eprintln!("{} already present with the expected sha256", args.out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(download(&args))?;
    Ok(ExitCode::SUCCESS)
}

async fn download(args: &Args) -> Result<()> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        .context("loading the system's TLS root certificates")?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut uri: hyper::Uri = args.uri.parse().with_context(|| format!("{:?} is not a URL", args.uri))?;
    let mut response = None;
    for _ in 0..=MAX_REDIRECTS {
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            bail!("{uri} is not an http:// or https:// URL");
        }
        let r = client.get(uri.clone()).await.with_context(|| format!("requesting {uri}"))?;
        if r.status().is_redirection() {
            let location = r.headers().get(hyper::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or_default();
            uri = resolve(&uri, location)
                .with_context(|| format!("{uri} redirected to an invalid location {location:?}"))?;
            continue;
        }
        if !r.status().is_success() {
            bail!("{uri} answered HTTP {}", r.status());
        }
        response = Some(r);
        break;
    }
    let response = response.with_context(|| format!("more than {MAX_REDIRECTS} redirects from {}", args.uri))?;
    let total =
        response.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());

    let partial = args.out.with_extension("partial");
    let result = save_verified(response, &partial, total, args).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Streams the body into `partial` while hashing it, checks length and digest, then renames it into place.
async fn save_verified(
    response: hyper::Response<hyper::body::Incoming>,
    partial: &Path,
    total: Option<u64>,
    args: &Args,
) -> Result<()> {
    let mut file = std::fs::File::create(partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut body = response.into_body();
    let (mut written, mut reported) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the download")?;
        if let Some(chunk) = frame.data_ref() {
            hasher.update(chunk);
            file.write_all(chunk).context("writing the download")?;
            written += chunk.len() as u64;
            if written - reported >= 64 << 20 {
                reported = written;
                match total {
                    Some(t) => eprintln!("downloaded {} of {} MiB", written >> 20, t >> 20),
                    None => eprintln!("downloaded {} MiB", written >> 20),
                }
            }
        }
    }
    file.flush()?;
    drop(file);
    let got = hex(&hasher.finalize());
    if let Some(t) = total.filter(|&t| t != written) {
        bail!("download truncated: {written} of {t} bytes");
    }
    match &args.sha256 {
        Some(want) if *want != got => {
            bail!("sha256 mismatch for {}: expected {want}, got {got}; the file was discarded", args.uri);
        }
        Some(_) => {}
        None => eprintln!("warning: no --sha256 given; downloaded file has sha256 {got}"),
    }
    std::fs::rename(partial, &args.out).with_context(|| format!("moving the download to {}", args.out.display()))?;
    eprintln!("fetched {} ({written} bytes, sha256 {got}) to {}", args.uri, args.out.display());
    Ok(())
}

/// Resolves a redirect Location (absolute, or absolute-path) against the request URI.
fn resolve(base: &hyper::Uri, location: &str) -> Result<hyper::Uri> {
    if location.starts_with('/') {
        let authority = base.authority().context("no authority")?;
        Ok(format!("{}://{authority}{location}", base.scheme_str().unwrap_or("http")).parse()?)
    } else {
        Ok(location.parse()?)
    }
}
