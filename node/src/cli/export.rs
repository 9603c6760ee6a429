//! `ballast volume export` / `import`: a volume to or from an image file
//! (raw, qcow2, or anything qemu-img reads) for backups off the cluster.
//! qemu-img does the copying over NBD with TLS, straight from or to the
//! node serving the volume, with a client certificate the CLI gets for its
//! own token's subject (kept in a private directory that is removed after).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::api::client::ApiClient;
use crate::api::{auth::Caller, ClientCert, ClientCertBody, CreateBody};
use crate::volume::VolumeInfo;

/// A private directory with the client certificate, removed when dropped.
struct CertDir(PathBuf);

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// qemu's options for the volume's NBD export over TLS, and the directory
/// holding the certificate they name.
fn nbd_image(client: &ApiClient, name: &str) -> Result<(OsString, String, CertDir, VolumeInfo)> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let info: VolumeInfo = client.get(&format!("/v1/volumes/{name}"))?;
    let address = if info.coordinator_nbd.is_empty() {
        bail!("volume {name} has no node serving it right now (see `ballast status`)");
    } else {
        info.coordinator_nbd.clone()
    };
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("the volume's NBD address {address:?} has no port"))?;
    let me: Caller = client.get("/v1/auth/whoami")?;
    let body = ClientCertBody {
        subject: me.subject,
        role: me.role,
        ttl_seconds: 86_400,
        groups: me.groups,
    };
    let cert: ClientCert = client.post("/v1/auth/certs", &body)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("ballast-export-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot make {}", dir.display()))?;
    let dir = CertDir(dir);
    for (file, text) in [
        ("ca-cert.pem", &cert.ca_pem),
        ("client-cert.pem", &cert.cert_pem),
        ("client-key.pem", &cert.key_pem),
    ] {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.0.join(file))?;
        out.write_all(text.as_bytes())?;
    }
    let mut object = OsString::from("tls-creds-x509,id=ballast0,endpoint=client,dir=");
    object.push(dir.0.as_os_str());
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let image = format!("driver=nbd,host={host},port={port},export={name},tls-creds=ballast0");
    Ok((object, image, dir, info))
}

fn qemu_img(args: &[OsString]) -> Result<()> {
    let status = std::process::Command::new("qemu-img")
        .args(args)
        .status()
        .context("cannot run qemu-img (install qemu-utils)")?;
    if !status.success() {
        bail!("qemu-img failed ({status}); see its message above");
    }
    Ok(())
}

fn progress_flag() -> Option<OsString> {
    std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| "-p".into())
}

/// `volume export NAME FILE`: the volume's bytes into an image file.
pub fn export(client: &ApiClient, name: &str, file: &Path, format: &str) -> Result<ExitCode> {
    if file.exists() {
        bail!("{} exists; export writes a new file (remove it first)", file.display());
    }
    let (object, image, _dir, info) = nbd_image(client, name)?;
    let mut args: Vec<OsString> = vec!["convert".into(), "-O".into(), format.into()];
    args.extend(progress_flag());
    args.extend([
        "--object".into(),
        object,
        "--image-opts".into(),
        image.into(),
        file.into(),
    ]);
    qemu_img(&args)?;
    println!(
        "exported volume {name} ({}) to {} ({format})",
        crate::size::format_size(info.size_bytes),
        file.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Creates volume `name` of `size_bytes` (4 KiB blocks, not encrypted) with `repl` replicas.
pub fn create_plain(client: &ApiClient, name: &str, size_bytes: u64, repl: u32) -> Result<VolumeInfo> {
    let body = CreateBody {
        name: name.to_owned(),
        size_bytes,
        block_size_bytes: 4096,
        replicas: repl,
        encrypted: false,
        passphrase: None,
        group: String::new(),
    };
    Ok(client.post("/v1/volumes", &body)?)
}

/// `volume import FILE NAME`: an image file into a volume, made to the
/// image's size when it does not exist.
pub fn import(client: &ApiClient, file: &Path, name: &str, repl: u32, format: Option<&str>) -> Result<ExitCode> {
    let mut info_args = vec!["info".to_owned(), "--output=json".to_owned()];
    if let Some(format) = format {
        info_args.extend(["-f".to_owned(), format.to_owned()]);
    }
    let output = std::process::Command::new("qemu-img")
        .args(&info_args)
        .arg(file)
        .output()
        .context("cannot run qemu-img (install qemu-utils)")?;
    if !output.status.success() {
        bail!(
            "qemu-img cannot read {}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let image: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("qemu-img info said something unexpected")?;
    let virtual_size = image["virtual-size"]
        .as_u64()
        .context("qemu-img info gave no virtual-size")?;
    let detected = image["format"].as_str().unwrap_or("raw").to_owned();
    let size_bytes = virtual_size.div_ceil(4096).max(1) * 4096;
    let existing: Result<VolumeInfo, _> = client.get(&format!("/v1/volumes/{name}"));
    let fresh = match existing {
        Ok(info) if info.size_bytes < virtual_size => bail!(
            "volume {name} is {} bytes, smaller than the image ({virtual_size} bytes): resize it first",
            info.size_bytes
        ),
        Ok(_) => false,
        Err(crate::api::client::ClientError::Refused { status: 404, .. }) => {
            create_plain(client, name, size_bytes, repl)?;
            println!("created volume {name} ({})", crate::size::format_size(size_bytes));
            true
        }
        Err(error) => return Err(error.into()),
    };
    let (object, target, _dir, _) = nbd_image(client, name)?;
    let mut args: Vec<OsString> = vec!["convert".into(), "-n".into(), "-f".into(), detected.clone().into()];
    if fresh {
        // A new volume reads as zeroes: holes in the image stay holes (thin).
        args.push("--target-is-zero".into());
    }
    args.extend(progress_flag());
    args.extend([
        "--object".into(),
        object,
        "--target-image-opts".into(),
        file.into(),
        target.into(),
    ]);
    qemu_img(&args)?;
    println!("imported {} ({detected}) into volume {name}", file.display());
    Ok(ExitCode::SUCCESS)
}
