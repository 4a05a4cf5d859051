//! TLS towards clients (rustls, ring provider) and what SCRAM channel
//! binding needs from it: the `tls-server-end-point` data of RFC 5929, a
//! hash of the server certificate made with the hash of its signature
//! algorithm (SHA-256 when that is MD5 or SHA-1), as PostgreSQL computes it.

use std::{path::Path, sync::Arc};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256, Sha384, Sha512};
use tracing::warn;
use x509_cert::der::{oid::ObjectIdentifier, Decode};

use super::PoolerError;

/// The client side's TLS, loaded once from the configured PEM files.
pub(crate) struct TlsSetup {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    /// Channel binding data for SCRAM-SHA-256-PLUS; `None` when the
    /// certificate's signature algorithm names no usable hash (Ed25519,
    /// RSA-PSS), and then only SCRAM-SHA-256 is offered.
    pub(crate) end_point: Option<Vec<u8>>,
}

impl TlsSetup {
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<TlsSetup, PoolerError> {
        let error = |what: String| {
            move |source: rustls::pki_types::pem::Error| PoolerError::Tls {
                what,
                source: std::io::Error::other(source.to_string()),
            }
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(error(format!("certificate {}", cert.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(error(format!("certificate {}", cert.display())))?;
        let end_point = match chain.first().map(|leaf| end_point_hash(leaf.as_ref())) {
            Some(Ok(hash)) => Some(hash),
            Some(Err(reason)) => {
                warn!(certificate = %cert.display(), reason, "SCRAM-SHA-256-PLUS (channel binding) is not offered");
                None
            }
            None => None,
        };
        let key_der =
            PrivateKeyDer::from_pem_file(key).map_err(error(format!("key {}", key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| {
                builder
                    .with_no_client_auth()
                    .with_single_cert(chain, key_der)
            })
            .map_err(|source| PoolerError::Tls {
                what: format!("certificate {} with key {}", cert.display(), key.display()),
                source: std::io::Error::other(source),
            })?;
        Ok(TlsSetup {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            end_point,
        })
    }
}

/// Signature algorithms by the hash `tls-server-end-point` must use.
const SHA256_SIGNATURES: [&str; 5] = [
    "1.2.840.113549.1.1.4",  // md5WithRSAEncryption: SHA-256 instead
    "1.2.840.113549.1.1.5",  // sha1WithRSAEncryption: SHA-256 instead
    "1.2.840.113549.1.1.11", // sha256WithRSAEncryption
    "1.2.840.10045.4.1",     // ecdsa-with-SHA1: SHA-256 instead
    "1.2.840.10045.4.3.2",   // ecdsa-with-SHA256
];
const SHA384_SIGNATURES: [&str; 2] = ["1.2.840.113549.1.1.12", "1.2.840.10045.4.3.3"];
const SHA512_SIGNATURES: [&str; 2] = ["1.2.840.113549.1.1.13", "1.2.840.10045.4.3.4"];

/// The `tls-server-end-point` channel binding data of a DER certificate.
pub(crate) fn end_point_hash(der: &[u8]) -> Result<Vec<u8>, String> {
    let certificate = x509_cert::Certificate::from_der(der)
        .map_err(|error| format!("cannot parse the certificate: {error}"))?;
    let algorithm: ObjectIdentifier = certificate.signature_algorithm.oid;
    let named = |list: &[&str]| {
        list.iter()
            .any(|oid| ObjectIdentifier::new(oid).is_ok_and(|oid| oid == algorithm))
    };
    if named(&SHA256_SIGNATURES) {
        Ok(Sha256::digest(der).to_vec())
    } else if named(&SHA384_SIGNATURES) {
        Ok(Sha384::digest(der).to_vec())
    } else if named(&SHA512_SIGNATURES) {
        Ok(Sha512::digest(der).to_vec())
    } else {
        Err(format!(
            "its signature algorithm {algorithm} names no hash for tls-server-end-point"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_that_does_not_parse_gets_no_channel_binding() {
        let error = end_point_hash(b"not a certificate").unwrap_err();
        assert!(error.contains("cannot parse"), "{error}");
    }
}
