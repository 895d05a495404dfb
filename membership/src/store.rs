//! The agent's data dir: node id, generation, certificates, and (on the authority) the CA key
//! and token records. Writes go to a temporary file that is synced and renamed into place, so a
//! crash leaves the old file or the new one, never half of either.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::identity::NodeId;
use crate::tls::{ClusterCa, NodeCredentials, TlsError, der_to_pem, pem_to_der};
use crate::token::{StoreError, TokenId, TokenRecord, TokenStore};

const NODE_ID: &str = "node-id";
const GENERATION: &str = "generation";
const NODE_CERT: &str = "node.crt";
const NODE_KEY: &str = "node.key";
/// The cluster CA certificate in a data dir (PEM): what the CLI trusts for an HTTPS API.
pub const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TOKENS: &str = "tokens.bin";
const TOKENS_VERSION: u8 = 1;

/// Data dir failures.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds something unexpected.
    #[error("{path}: {reason}")]
    Corrupt {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data dir can be read or entered by users other than its owner.
    #[error(
        "{path} is open to other users (mode {mode:03o}); it holds this node's keys: \
         run `chmod 700 {path}` or choose another --data-dir"
    )]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A stored certificate or key does not parse.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One agent's data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Opens the directory, creating it (mode 0700) if it does not exist. An existing
    /// directory that group or others may read, write or enter is refused: it holds keys.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, DataDirError> {
        let root = root.into();
        let io = |source| DataDirError::Io {
            path: root.clone(),
            source,
        };
        match fs::metadata(&root) {
            Ok(meta) => check_private(&root, &meta)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_private(&root).map_err(io)?
            }
            Err(e) => return Err(io(e)),
        }
        Ok(DataDir { root })
    }

    /// Whether `root` holds a node that already belongs to a cluster. Reads only; creates
    /// nothing, so callers can refuse bad flags before the directory exists.
    pub fn is_member(root: &Path) -> bool {
        root.join(NODE_CERT).is_file()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, DataDirError> {
        let path = self.file(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DataDirError::Io { path, source }),
        }
    }

    fn read_text(&self, name: &str) -> Result<Option<String>, DataDirError> {
        self.read(name)?
            .map(|b| {
                String::from_utf8(b).map_err(|_| DataDirError::Corrupt {
                    path: self.file(name),
                    reason: "not UTF-8".into(),
                })
            })
            .transpose()
    }

    /// Writes a file atomically, readable by the owner only.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), DataDirError> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        let io = |source| DataDirError::Io {
            path: path.clone(),
            source,
        };
        let mut f = open_private(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(dir) = fs::File::open(&self.root) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// The node id, created from `random` the first time.
    pub fn node_id(&self, random: [u8; 8]) -> Result<NodeId, DataDirError> {
        if let Some(text) = self.read_text(NODE_ID)? {
            return text
                .trim()
                .parse()
                .map_err(
                    |e: crate::identity::ParseNodeIdError| DataDirError::Corrupt {
                        path: self.file(NODE_ID),
                        reason: e.to_string(),
                    },
                );
        }
        let id = NodeId::from_random(random);
        self.write(NODE_ID, format!("{id}\n").as_bytes())?;
        Ok(id)
    }

    /// Bumps and returns the generation: every start of the agent is a new generation.
    pub fn next_generation(&self) -> Result<u64, DataDirError> {
        let current = match self.read_text(GENERATION)? {
            Some(t) => t.trim().parse::<u64>().map_err(|e| DataDirError::Corrupt {
                path: self.file(GENERATION),
                reason: e.to_string(),
            })?,
            None => 0,
        };
        let next = current + 1;
        self.write(GENERATION, format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    /// The node's credentials, if it has joined a cluster. The node id is the one its
    /// certificate names (and must match the `node-id` file): a node is who the CA signed.
    pub fn credentials(&self) -> Result<Option<NodeCredentials>, DataDirError> {
        let (Some(cert), Some(key), Some(ca)) = (
            self.read_text(NODE_CERT)?,
            self.read_text(NODE_KEY)?,
            self.read_text(CA_CERT)?,
        ) else {
            return Ok(None);
        };
        let cert_der = pem_to_der(&cert)?;
        let corrupt = |reason: String| DataDirError::Corrupt {
            path: self.file(NODE_CERT),
            reason,
        };
        let id = crate::tls::node_id_of(&cert_der)
            .ok_or_else(|| corrupt("the certificate names no node".into()))?;
        if let Some(text) = self.read_text(NODE_ID)?
            && text.trim() != id.to_string()
        {
            return Err(corrupt(format!(
                "the certificate names node {id}, the node-id file {}",
                text.trim()
            )));
        }
        Ok(Some(NodeCredentials {
            id,
            cert_der,
            ca_der: pem_to_der(&ca)?,
            key_der: pem_to_der(&key)?.to_vec(),
        }))
    }

    /// Stores the node's credentials, and its id as the certificate names it.
    pub fn save_credentials(&self, creds: &NodeCredentials) -> Result<(), DataDirError> {
        self.write(NODE_ID, format!("{}\n", creds.id).as_bytes())?;
        self.write(CA_CERT, der_to_pem("CERTIFICATE", &creds.ca_der).as_bytes())?;
        self.write(
            NODE_KEY,
            der_to_pem("PRIVATE KEY", &creds.key_der).as_bytes(),
        )?;
        self.write(
            NODE_CERT,
            der_to_pem("CERTIFICATE", &creds.cert_der).as_bytes(),
        )
    }

    /// The cluster CA, if this node holds its key.
    pub fn cluster_ca(&self) -> Result<Option<ClusterCa>, DataDirError> {
        match (self.read_text(CA_CERT)?, self.read_text(CA_KEY)?) {
            (Some(cert), Some(key)) => Ok(Some(ClusterCa::from_pem(&cert, &key)?)),
            _ => Ok(None),
        }
    }

    /// Stores the CA key (the CA certificate goes with the node credentials).
    pub fn save_ca_key(&self, ca: &ClusterCa) -> Result<(), DataDirError> {
        self.write(CA_KEY, ca.key_pem().as_bytes())
    }

    /// The token store in this directory.
    pub fn token_store(&self) -> FileTokenStore {
        FileTokenStore { dir: self.clone() }
    }
}

#[cfg(unix)]
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> std::io::Result<()> {
    fs::create_dir_all(path)
}

#[cfg(unix)]
fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), DataDirError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(DataDirError::NotPrivate {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_: &Path, _: &fs::Metadata) -> Result<(), DataDirError> {
    Ok(())
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<fs::File> {
    fs::File::create(path)
}

/// Token records in one file of the data dir: a version byte, then postcard.
pub struct FileTokenStore {
    dir: DataDir,
}

impl TokenStore for FileTokenStore {
    fn load(&self) -> Result<BTreeMap<TokenId, TokenRecord>, StoreError> {
        let bytes = match self.dir.read(TOKENS) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(BTreeMap::new()),
            Err(e) => return Err(StoreError::Corrupt(e.to_string())),
        };
        match bytes.split_first() {
            Some((&TOKENS_VERSION, body)) => {
                let records: Vec<TokenRecord> =
                    postcard::from_bytes(body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(records.into_iter().map(|r| (r.id, r)).collect())
            }
            _ => Err(StoreError::Corrupt("unknown token store version".into())),
        }
    }

    fn save(&mut self, records: &BTreeMap<TokenId, TokenRecord>) -> Result<(), StoreError> {
        let list: Vec<&TokenRecord> = records.values().collect();
        let mut bytes = vec![TOKENS_VERSION];
        bytes.extend(postcard::to_allocvec(&list).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        self.dir
            .write(TOKENS, &bytes)
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenAuthority;

    /// A CA, and credentials from it for `id` saved in `dir` with the CA key.
    fn enroll(dir: &DataDir, id: NodeId) -> ClusterCa {
        let ca = ClusterCa::generate("t", [1; 32]).unwrap();
        let validity =
            crate::tls::Validity::starting(1_700_000_000, std::time::Duration::from_secs(3600));
        dir.save_credentials(&ca.issue_node(id, [2; 32], validity).unwrap())
            .unwrap();
        dir.save_ca_key(&ca).unwrap();
        ca
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[cfg(unix)]
    #[test]
    fn a_new_data_dir_and_its_files_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b");
        let dir = DataDir::open(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        let id = dir.node_id([4; 8]).unwrap();
        let ca = enroll(&dir, id);
        let mut auth = TokenAuthority::new(dir.token_store(), ca.fingerprint());
        auth.issue(10, 100, [1; 40]).unwrap();
        for name in [NODE_KEY, NODE_CERT, CA_KEY, CA_CERT, TOKENS, NODE_ID] {
            assert_eq!(mode(&root.join(name)), 0o600, "{name}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_data_dir_open_to_others_is_refused_by_name() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        for bits in [0o755, 0o750, 0o701, 0o704] {
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(bits)).unwrap();
            let err = DataDir::open(tmp.path()).unwrap_err();
            assert!(matches!(err, DataDirError::NotPrivate { mode, .. } if mode == bits));
            let text = err.to_string();
            assert!(text.contains(&tmp.path().display().to_string()), "{text}");
            assert!(text.contains("chmod 700"), "{text}");
        }
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
        DataDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn identity_and_tokens_persist_across_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        let dir = DataDir::open(&root).unwrap();
        let id = dir.node_id([4; 8]).unwrap();
        assert_eq!(DataDir::open(&root).unwrap().node_id([5; 8]).unwrap(), id);
        assert_eq!(dir.next_generation().unwrap(), 1);
        assert_eq!(dir.next_generation().unwrap(), 2);

        let ca = enroll(&dir, id);
        assert_eq!(
            dir.cluster_ca().unwrap().unwrap().fingerprint(),
            ca.fingerprint()
        );
        assert_eq!(
            dir.credentials().unwrap().unwrap().ca_fingerprint(),
            ca.fingerprint()
        );
        // The id comes from the certificate, and must agree with the node-id file.
        assert_eq!(dir.credentials().unwrap().unwrap().id, id);
        dir.write(NODE_ID, b"0000000000000001\n").unwrap();
        assert!(matches!(
            dir.credentials(),
            Err(DataDirError::Corrupt { .. })
        ));

        let mut auth = TokenAuthority::new(dir.token_store(), ca.fingerprint());
        let token = auth.issue(10, 100, [1; 40]).unwrap();
        let again = TokenAuthority::new(
            DataDir::open(&root).unwrap().token_store(),
            ca.fingerprint(),
        );
        assert_eq!(again.check(token.id, &token.secret, 20).unwrap(), Ok(()));
    }
}
