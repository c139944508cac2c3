//! The worker's client over TLS, against a server that offers HTTP/2: a session's event stream
//! stays on HTTP/1.1 — a connection of its own — while other requests may take HTTP/2. Over
//! HTTP/2 the streams, as long-lived as their sessions, would fill one connection's
//! concurrent-stream limit and stall every request queued behind them, heartbeats included.
//!
//! Alone in its binary: it points `SSL_CERT_FILE` (read when a client is built) at its own CA.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stockade::control_plane::client::{AuthScheme, Client};
use stockade::control_plane::Secret;

/// A TLS server on loopback offering `h2` and `http/1.1`: it records the protocol each connection
/// chose; an HTTP/1.1 request gets an event stream's headers and a ping, an HTTP/2 one is closed.
fn server(chain: Vec<rustls::pki_types::CertificateDer<'static>>, key: Vec<u8>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()))
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let chosen = Arc::new(Mutex::new(Vec::new()));
    let seen = chosen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (cfg, seen) = (cfg.clone(), seen.clone());
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                // The handshake happens on the first read.
                while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
                    match tls.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                    if head.len() == 1 {
                        let alpn = tls.conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                        seen.lock().unwrap().push(alpn.clone().unwrap_or_else(|| "none".into()));
                        if alpn.as_deref() == Some("h2") {
                            return;
                        }
                    }
                }
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nevent: ping\ndata: {}\n\n");
                let _ = tls.flush();
                std::thread::sleep(Duration::from_secs(2));
            });
        }
    });
    (port, chosen)
}

#[test]
fn event_streams_stay_on_http1_where_other_requests_take_http2() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("stockade-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    // SAFETY: this binary runs this one test; nothing reads the environment concurrently.
    unsafe { std::env::set_var("SSL_CERT_FILE", &ca_file) };
    let (port, chosen) = server(vec![leaf.der().clone()], leaf_key.serialize_der());

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut client =
        Client::new(&format!("https://127.0.0.1:{port}"), Secret::new("k".to_owned()), AuthScheme::Bearer).unwrap();
    client.attempts = 1;
    client.timeout = Duration::from_secs(5);
    rt.block_on(async {
        let stream = client.stream_events("sesn_1").await;
        assert!(stream.is_ok(), "the stream did not open over HTTP/1.1: {:?}", stream.err());
        // The control: the same server gives HTTP/2 to a client that offers it (and then closes
        // the connection, which this server cannot serve).
        let _ = client.session("sesn_1").await;
    });
    let chosen = chosen.lock().unwrap().clone();
    assert_eq!(chosen.first().map(String::as_str), Some("http/1.1"), "the event stream's connection: {chosen:?}");
    assert!(chosen.iter().any(|p| p == "h2"), "the control never negotiated HTTP/2: {chosen:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
