//! TLS for tests: a throw-away CA ([`Pki`]) that issues server certificates for `127.0.0.1` and
//! `localhost` (and expired or mismatched ones), a `[tls]` config section pointing at them, and
//! [`Client`]s over a rustls stream.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::config::Config;
use super::net::{Client, ReadTimeout};
use super::wait::WAIT;

/// A TLS stream the test drives by hand.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;
/// A line client over TLS.
pub type TlsClient = Client<TlsStream>;

impl ReadTimeout for TlsStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

/// A test CA, its certificate written to `dir/ca.pem`, issuing leaves into `dir`.
pub struct Pki {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_path: PathBuf,
}

impl Pki {
    /// A new CA named `name`, writing its files into `dir`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let ca_path = dir.join(format!("{name}.pem").replace(' ', "-"));
        std::fs::write(&ca_path, ca.pem()).expect("write CA");
        Pki {
            dir: dir.to_owned(),
            ca,
            ca_path,
        }
    }

    /// Issues a leaf for `names` (`127.0.0.1`, `localhost`) with common name `cn`, valid
    /// until `not_after` (year), and writes `fullchain.pem` (leaf, then CA) and `privkey.pem`
    /// to `cert` and `key`. Returns the leaf.
    pub fn issue(
        &self,
        cert: &Path,
        key: &Path,
        cn: &str,
        names: &[&str],
        not_after: i32,
    ) -> CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = params.signed_by(&leaf_key, &self.ca).expect("leaf");
        std::fs::write(cert, format!("{}{}", leaf.pem(), self.ca.pem())).expect("write cert");
        std::fs::write(key, leaf_key.serialize_pem()).expect("write key");
        leaf.der().clone()
    }

    /// A valid leaf for 127.0.0.1 and localhost at `dir/NAME.crt` and `dir/NAME.key`.
    pub fn leaf(&self, name: &str) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let (cert, key) = self.paths(name);
        let der = self.issue(&cert, &key, name, &["127.0.0.1", "localhost"], 2090);
        (cert, key, der)
    }

    /// Where [`Pki::leaf`] writes `name`'s files.
    pub fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }

    /// The test config with a `[tls]` table on 127.0.0.1:0 for `cert` and `key`.
    pub fn config(cert: &Path, key: &Path) -> Config {
        Config::test()
            .set("tls", "listen", "[\"127.0.0.1:0\"]")
            .set_str("tls", "certificate", &cert.display().to_string())
            .set_str("tls", "private-key", &key.display().to_string())
    }

    /// A client config trusting this CA only.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("CA into roots");
        Arc::new(
            ClientConfig::builder_with_provider(chatd::tls::provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// A TLS stream to `addr` for `server_name`, the handshake done.
    pub fn stream(&self, addr: SocketAddr, server_name: &str) -> TlsStream {
        let tcp = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let name = ServerName::try_from(server_name.to_owned()).expect("server name");
        let conn = ClientConnection::new(self.client_config(), name).expect("client connection");
        let mut s = StreamOwned::new(conn, tcp);
        s.sock.set_read_timeout(Some(WAIT)).expect("timeout");
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).expect("TLS handshake");
        }
        s
    }

    /// A line client over TLS to `addr` (verified as `localhost`).
    pub fn connect(&self, addr: SocketAddr) -> TlsClient {
        Client::new(self.stream(addr, "localhost"))
    }

    /// Connects over TLS and takes `name`; returns once the welcome, MOTD and history were read.
    pub fn join(&self, addr: SocketAddr, name: &str) -> TlsClient {
        let mut c = self.connect(addr);
        c.join_as(name);
        c.send("/who");
        c.expect_prefix("*** WHO ");
        c
    }
}

/// The leaf certificate a TLS stream's server presented.
pub fn peer_leaf(s: &TlsStream) -> CertificateDer<'static> {
    s.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}
