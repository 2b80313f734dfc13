//! `rim cert`: a private CA and one certificate signed by it, as PEM files,
//! for a cluster whose operators have no CA of their own (and for trying
//! TLS locally).
//!
//! The leaf is valid for server and client authentication, so the same
//! files serve every node's listeners, the gateways' client-facing ports,
//! and mutual TLS between them. The CA's key is not written: to add a node
//! with a new name later, make a new set (or use your own CA).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use rim_cluster::tls::pki::Authority;

/// Flags of `rim cert`.
#[derive(Args, Debug)]
pub struct CertArgs {
    /// Directory to write ca.pem, cert.pem and key.pem into (created).
    #[arg(long, default_value = "rim-tls")]
    out: PathBuf,
    /// DNS names and IP addresses the certificate is valid for (repeat or
    /// comma-separate).
    #[arg(long = "name", value_delimiter = ',', default_values_t = ["127.0.0.1".to_string(), "localhost".to_string()])]
    names: Vec<String>,
    /// Replace files that already exist.
    #[arg(long)]
    force: bool,
}

/// Writes the CA certificate and a leaf certificate with its key.
pub fn run(args: CertArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let files = ["ca.pem", "cert.pem", "key.pem"].map(|f| args.out.join(f));
    if !args.force
        && let Some(existing) = files.iter().find(|p| p.exists())
    {
        anyhow::bail!("{} exists; pass --force to replace it", existing.display());
    }
    let ca = Authority::new("rim")?;
    let leaf = ca.issue(&args.names)?;
    write(&files[0], &ca.cert_pem(), false)?;
    write(&files[1], &leaf.cert_pem, false)?;
    write(&files[2], &leaf.key_pem, true)?;
    println!(
        "wrote {} (trust it), {} and {} for {}",
        files[0].display(),
        files[1].display(),
        files[2].display(),
        args.names.join(", ")
    );
    Ok(())
}

fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}
