//! HTTPS for protected metrics: the certificate and key of `--metrics-cert-dir`
//! (`tls.crt`, `tls.key`: a Secret from cert-manager mounted there), else a self-signed
//! certificate made at start (scrapers then skip verification, as with kubebuilder's
//! default). The axum router is served over rustls, one task per connection.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

use super::TelemetryError;

/// The TLS acceptor for the metrics server.
pub fn acceptor(cert_dir: Option<&Path>) -> Result<TlsAcceptor, TelemetryError> {
    let (certs, key) = match cert_dir {
        Some(dir) => load(dir)?,
        None => self_signed()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| TelemetryError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load(
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TelemetryError> {
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        TelemetryError::Tls(format!("cannot read {}: {e}", what.display()))
    };
    let certs = CertificateDer::pem_file_iter(&crt)
        .map_err(|e| bad(&crt, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&crt, &e))?;
    if certs.is_empty() {
        return Err(bad(&crt, &"no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| bad(&key, &e))?;
    Ok((certs, key))
}

fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TelemetryError> {
    let host = std::env::var("POD_NAME").unwrap_or_else(|_| "leasekeeper".into());
    let made = rcgen::generate_simple_self_signed(vec![host, "localhost".into()])
        .map_err(|e| TelemetryError::Tls(format!("cannot make a self-signed certificate: {e}")))?;
    let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
        .map_err(|e| TelemetryError::Tls(e.to_string()))?;
    Ok((vec![made.cert.der().clone()], key))
}

/// Serves `app` over TLS on `listener` until the task is dropped. A failed handshake or
/// connection ends only that connection.
pub async fn serve(listener: TcpListener, app: Router, acceptor: TlsAcceptor) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of file descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cert_dir_is_loaded_and_a_missing_file_is_named() {
        let dir = std::env::temp_dir().join(format!("lk-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        std::fs::write(dir.join("tls.crt"), made.cert.pem()).expect("crt");
        std::fs::write(dir.join("tls.key"), made.signing_key.serialize_pem()).expect("key");
        assert!(acceptor(Some(&dir)).is_ok());
        std::fs::remove_file(dir.join("tls.key")).expect("rm");
        let err = acceptor(Some(&dir)).err().expect("refused").to_string();
        assert!(err.contains("tls.key"), "{err}");
        assert!(acceptor(None).is_ok(), "self-signed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
