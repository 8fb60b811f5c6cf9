//! Certificates: the development CA and server certificate that TLS listeners fall back to,
//! the files `petrel certs` writes, and PEM loading for rustls.
//!
//! Generated with `rcgen` (ring). Private keys are written owner-only. Nothing here is meant
//! for production PKI: it exists so that TLS, WSS and QUIC work out of the box and mTLS can
//! be tried with one command.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{x509, TransportError};

/// How long generated certificates stay valid.
const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 825;
/// A reused development certificate must stay valid at least this long, or it is remade.
const RENEW_MARGIN: Duration = Duration::from_secs(86_400);

/// A certificate and its private key, as PEM.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A certificate authority that can sign leaves.
pub struct Authority {
    cert: Certificate,
    key: KeyPair,
}

impl Authority {
    /// A fresh self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, TransportError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY_DAYS);
        let key = KeyPair::generate().map_err(generation)?;
        let cert = params.self_signed(&key).map_err(generation)?;
        Ok(Self { cert, key })
    }

    pub fn pem(&self) -> Pem {
        Pem {
            cert: self.cert.pem(),
            key: self.key.serialize_pem(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses; the first is the CN).
    pub fn server(&self, names: &[String]) -> Result<Pem, TransportError> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(generation)?;
        params.distinguished_name = name(names.first().map_or("petrel", String::as_str));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(params)
    }

    /// A client certificate for mTLS whose CN (and DNS SAN) is `common_name`.
    pub fn client(&self, common_name: &str) -> Result<Pem, TransportError> {
        let mut params =
            CertificateParams::new(vec![common_name.to_owned()]).map_err(generation)?;
        params.distinguished_name = name(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.leaf(params)
    }

    fn leaf(&self, mut params: CertificateParams) -> Result<Pem, TransportError> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY_DAYS);
        let key = KeyPair::generate().map_err(generation)?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(generation)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Petrel development");
    name.push(DnType::CommonName, common_name);
    name
}

/// Valid from yesterday (clock skew) for `days`. Dates are whole days in UTC.
fn set_validity(params: &mut CertificateParams, days: i64) {
    let today = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| (d.as_secs() / 86_400) as i64);
    let date = |days: i64| {
        let (year, month, day) = x509::civil_from_days(days);
        rcgen::date_time_ymd(year as i32, month, day)
    };
    params.not_before = date(today - 1);
    params.not_after = date(today + days);
}

fn generation(err: rcgen::Error) -> TransportError {
    TransportError::Generate(err.to_string())
}

/// The names a development server certificate covers.
pub fn dev_server_names() -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Some(host) = host_name() {
        if !names.contains(&host) {
            names.push(host);
        }
    }
    names
}

fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    let name = name.trim();
    // Only names rcgen will take as a DNS SAN.
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    ok.then(|| name.to_owned())
}

/// The files of the development certificate under `<data_dir>/certs/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DevCerts {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }

    /// Reuses the development CA and server certificate in `dir`, or makes new ones when a
    /// file is missing, unreadable, or expires within a day.
    pub fn ensure(dir: &Path) -> Result<Self, TransportError> {
        let files = Self::in_dir(dir);
        if files.usable() {
            return Ok(files);
        }
        std::fs::create_dir_all(dir).map_err(|source| TransportError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let ca = Authority::generate("Petrel development CA")?;
        let server = ca.server(&dev_server_names())?;
        let ca = ca.pem();
        write_private(&dir.join("ca.key"), &ca.key)?;
        write_public(&files.ca, &ca.cert)?;
        write_private(&files.key, &server.key)?;
        write_public(&files.cert, &server.cert)?;
        tracing::info!(dir = %dir.display(), "generated a development CA and server certificate");
        Ok(files)
    }

    fn usable(&self) -> bool {
        let fresh = |path: &Path| {
            load_certs(path).is_ok_and(|certs| {
                certs
                    .first()
                    .and_then(|c| x509::not_after(c))
                    .is_some_and(|end| end > SystemTime::now() + RENEW_MARGIN)
            })
        };
        fresh(&self.ca) && fresh(&self.cert) && load_key(&self.key).is_ok()
    }
}

/// What `petrel certs --out DIR` writes: a CA, a server certificate and a client certificate.
pub fn write_bundle(dir: &Path, client_cn: &str) -> Result<Vec<PathBuf>, TransportError> {
    std::fs::create_dir_all(dir).map_err(|source| TransportError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let ca = Authority::generate("Petrel development CA")?;
    let server = ca.server(&dev_server_names())?;
    let client = ca.client(client_cn)?;
    let ca_pem = ca.pem();
    let mut written = Vec::new();
    for (stem, pem) in [("ca", &ca_pem), ("server", &server), ("client", &client)] {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        write_private(&key, &pem.key)?;
        write_public(&cert, &pem.cert)?;
        written.extend([cert, key]);
    }
    Ok(written)
}

fn write_public(path: &Path, text: &str) -> Result<(), TransportError> {
    std::fs::write(path, text).map_err(|source| TransportError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), TransportError> {
    write_owner_only(path, text).map_err(|source| TransportError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `text` to a file readable by its owner only (keys, password files, generated
/// passwords); an existing file's mode is tightened first, since opening keeps it.
pub fn write_owner_only(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(0o600);
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    options.open(path)?.write_all(text.as_bytes())
}

/// Every certificate in a PEM file; an error when there is none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bad = |message: String| TransportError::Pem {
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE found".into()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TransportError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("petrel-certs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn dev_certs_are_made_once_and_reused() {
        let dir = temp_dir("reuse");
        let first = DevCerts::ensure(&dir).unwrap();
        let ca = std::fs::read(&first.ca).unwrap();
        let second = DevCerts::ensure(&dir).unwrap();
        assert_eq!(first, second);
        assert_eq!(
            std::fs::read(&second.ca).unwrap(),
            ca,
            "a valid CA is reused"
        );
        let der = &load_certs(&first.cert).unwrap()[0];
        assert_eq!(x509::first_dns_name(der).as_deref(), Some("localhost"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&first.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreadable_dev_certs_are_remade() {
        let dir = temp_dir("remake");
        let first = DevCerts::ensure(&dir).unwrap();
        let ca = std::fs::read(&first.ca).unwrap();
        std::fs::write(&first.key, "not a key").unwrap();
        let second = DevCerts::ensure(&dir).unwrap();
        assert!(load_key(&second.key).is_ok());
        assert_ne!(
            std::fs::read(&second.ca).unwrap(),
            ca,
            "a new CA signs the new certificate"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_bundle_has_a_client_certificate_with_the_given_cn() {
        let dir = temp_dir("bundle");
        let written = write_bundle(&dir, "sensor-9").unwrap();
        assert_eq!(written.len(), 6);
        let client = &load_certs(&dir.join("client.pem")).unwrap()[0];
        assert_eq!(x509::common_name(client).as_deref(), Some("sensor-9"));
        let end = x509::not_after(client).unwrap();
        assert!(end > SystemTime::now() + Duration::from_secs(800 * 86_400));
        assert!(load_key(&dir.join("client.key")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
