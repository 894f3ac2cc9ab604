//! The node's side of the transport security: credentials of the built-in cluster PKI (made
//! when this node bootstraps a cluster, obtained with a join token otherwise, kept in
//! `<data dir>/pki`), or the operator's PKI, or (loopback only) none.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use kms_core::security::ClusterCa;
use kms_raft::error::TransportError;
use kms_raft::grpc::Enrollment;
use kms_raft::network::Transport;
use kms_raft::pki::{self, JoinTokenString, NodeCredentials};
use kms_raft::tls::{fetch_pinned_ca, Security};

use crate::config::{Config, RaftSecurity};

/// The CA key of a bootstrapping node, kept until the replicated state holds it (a crash
/// before that commit would otherwise leave a cluster whose CA nobody can sign with).
const CA_KEY_FILE: &str = "ca.key";
/// Gives up enrolling after this long.
const ENROLL_DEADLINE: Duration = Duration::from_secs(600);

pub fn pki_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("pki")
}

/// How the transport is secured, and the CA to commit when this node bootstraps a cluster.
pub async fn prepare(config: &Config) -> anyhow::Result<(Security, Option<ClusterCa>)> {
    match &config.raft_security {
        RaftSecurity::Insecure => {
            tracing::warn!(
                raft = %config.raft_listen,
                "INSECURE raft transport: plain TCP between nodes, no authentication (loopback only)"
            );
            Ok((Security::Insecure, None))
        }
        RaftSecurity::OperatorPki(files) => Ok((Security::Operator(files.clone()), None)),
        RaftSecurity::ClusterPki => cluster_pki(config).await,
    }
}

async fn cluster_pki(config: &Config) -> anyhow::Result<(Security, Option<ClusterCa>)> {
    let dir = pki_dir(&config.data_dir);
    if let Some(creds) = NodeCredentials::load(&dir).context("node credentials")? {
        creds.check().context("node key")?;
        let ca_key = dir.join(CA_KEY_FILE);
        let ca = if ca_key.exists() {
            let key_pem = std::fs::read_to_string(&ca_key)
                .with_context(|| format!("cannot read {}", ca_key.display()))?;
            let key = pem::parse(key_pem)
                .with_context(|| format!("{}: not PEM", ca_key.display()))?
                .into_contents();
            Some(ClusterCa {
                cert_der: creds.ca_der.clone(),
                key_der: key,
            })
        } else {
            None
        };
        tracing::info!(
            ca = %pki::fingerprint_hex(&creds.ca_fingerprint()),
            days_left = pki::days_left(&creds.cert_der),
            "cluster PKI: using this node's certificate"
        );
        return Ok((Security::Pki(creds), ca));
    }
    if config.join.is_empty() {
        // A new cluster: this node makes its CA.
        let ca = pki::new_ca(&format!("node-{}", config.node_id)).context("cluster CA")?;
        let creds =
            NodeCredentials::self_issued(&ca, config.node_id).context("node certificate")?;
        creds.save(&dir).context("saving the node credentials")?;
        let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", ca.key_der.clone()));
        write_private(&dir.join(CA_KEY_FILE), &key_pem)?;
        tracing::info!(
            ca = %pki::fingerprint_hex(&creds.ca_fingerprint()),
            "cluster PKI: created the cluster CA; other nodes join with tokens from `kmsctl cluster token create`"
        );
        return Ok((Security::Pki(creds), Some(ca)));
    }
    let creds = match (&config.join_token, &config.cluster_secret) {
        (Some(token), _) => enroll(config, token).await?,
        (None, Some(secret)) => enroll_with_secret(config, secret).await?,
        (None, None) => anyhow::bail!(
            "joining a cluster with the built-in PKI needs --join-token (create one on a member: \
             kmsctl cluster token create) or the deployment's --cluster-secret-file"
        ),
    };
    creds.save(&dir).context("saving the node credentials")?;
    Ok((Security::Pki(creds), None))
}

/// Drops the kept CA key once the replicated state holds the CA.
pub fn forget_ca_key(data_dir: &Path) {
    let path = pki_dir(data_dir).join(CA_KEY_FILE);
    if path.exists() {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!("cluster CA committed; the bootstrap copy of its key is removed")
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot remove the bootstrap CA key")
            }
        }
    }
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// With the deployment's shared secret (no CA fingerprint to pin): a member must first prove it
/// knows the secret for the CA it presents; that CA is then pinned like a token's.
async fn enroll_with_secret(config: &Config, secret: &str) -> anyhow::Result<NodeCredentials> {
    let secret_sha256 = pki::fingerprint(secret.as_bytes());
    let transport = Transport {
        tls: None,
        cluster_id: Default::default(),
        connect_timeout: Duration::from_secs(3),
        channels: Default::default(),
    };
    let started = Instant::now();
    let mut delay = Duration::from_millis(300);
    loop {
        for addr in &config.join {
            let chain = match kms_raft::tls::fetch_chain(addr, Duration::from_secs(5)).await {
                Ok(chain) => chain,
                Err(e) => {
                    tracing::warn!(member = %addr, error = %e, "cluster member not reachable; retrying");
                    continue;
                }
            };
            // The CA is the last certificate of the chain a member presents.
            let Some(candidate) = chain.last().cloned() else {
                continue;
            };
            let challenge: [u8; 32] = rand::random();
            let ca_fp = pki::fingerprint(&candidate);
            match transport
                .challenge(
                    addr,
                    &candidate,
                    pki::DEPLOY_TOKEN_ID,
                    &challenge,
                    Duration::from_secs(10),
                )
                .await
            {
                Ok((proof, ca)) => {
                    let expected = pki::token_proof(&secret_sha256, &challenge, &ca_fp);
                    if proof != expected || pki::fingerprint(&ca) != ca_fp {
                        anyhow::bail!(
                            "{addr} could not prove it knows the cluster secret: another cluster, or \
                             someone in between; nothing was sent"
                        );
                    }
                    let token = JoinTokenString {
                        ca_fingerprint: ca_fp,
                        id: pki::DEPLOY_TOKEN_ID.to_owned(),
                        secret: secret.to_owned(),
                    };
                    return enroll(config, &token).await;
                }
                // Also while the bootstrapping node has not committed the CA and its token yet.
                Err(e) => tracing::warn!(member = %addr, error = %e, "no proof yet; retrying"),
            }
        }
        if started.elapsed() > ENROLL_DEADLINE {
            anyhow::bail!(
                "could not enroll at any of {:?} within {ENROLL_DEADLINE:?}",
                config.join
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Obtains this node's certificate from a member with the join token: checks the member's
/// CA against the token's fingerprint before sending anything, then enrolls at the leader.
async fn enroll(config: &Config, token: &JoinTokenString) -> anyhow::Result<NodeCredentials> {
    let request = pki::new_key_and_csr(config.node_id).context("node key")?;
    let transport = Transport {
        tls: None,
        cluster_id: Default::default(),
        connect_timeout: Duration::from_secs(3),
        channels: Default::default(),
    };
    let started = Instant::now();
    let mut delay = Duration::from_millis(300);
    let mut targets: Vec<String> = config.join.clone();
    loop {
        let mut next_targets = Vec::new();
        for addr in &targets {
            let ca_der = match fetch_pinned_ca(addr, &token.ca_fingerprint, Duration::from_secs(5))
                .await
            {
                Ok(ca) => ca,
                Err(TransportError::Refused(m)) => anyhow::bail!("{m}"),
                Err(e) => {
                    tracing::warn!(member = %addr, error = %e, "cluster member not reachable; retrying");
                    continue;
                }
            };
            let enrollment = Enrollment {
                token_id: token.id.clone(),
                token_secret: token.secret.clone(),
                node_id: config.node_id,
                csr_der: request.csr_der.clone(),
            };
            match transport
                .enroll(addr, &ca_der, enrollment, Duration::from_secs(30))
                .await
            {
                Ok(enrolled) => {
                    if pki::fingerprint(&enrolled.ca_der) != token.ca_fingerprint {
                        anyhow::bail!("{addr} answered with a CA the join token does not name");
                    }
                    tracing::info!(via = %addr, "enrolled: received this node's certificate");
                    return Ok(NodeCredentials {
                        ca_der: enrolled.ca_der,
                        cert_der: enrolled.cert_der,
                        key_der: request.key_der,
                    });
                }
                Err(TransportError::Redirect(leader)) if !leader.is_empty() => {
                    tracing::info!(via = %addr, %leader, "enrolling at the leader");
                    next_targets.push(leader);
                }
                Err(TransportError::Refused(m)) => anyhow::bail!("join token refused by {m}"),
                Err(TransportError::Remote(m)) => anyhow::bail!("enrollment refused: {m}"),
                Err(e) => {
                    tracing::warn!(member = %addr, error = %e, "enrollment not accepted yet; retrying")
                }
            }
        }
        if started.elapsed() > ENROLL_DEADLINE {
            anyhow::bail!(
                "could not enroll at any of {:?} within {ENROLL_DEADLINE:?}",
                config.join
            );
        }
        if next_targets.is_empty() {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            targets = config.join.clone();
        } else {
            targets = next_targets;
        }
    }
}
