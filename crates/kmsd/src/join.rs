//! Joining an existing cluster. With the built-in cluster PKI an enrolled node asks the
//! leader over the Raft transport (its certificate names it); with an operator PKI or the
//! loopback-only insecure transport it asks a member's admin API (the admin token authorises
//! it, and a follower redirects to the leader's admin API).

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use kms_raft::error::TransportError;

use crate::config::{Config, RaftSecurity};
use crate::engine::Engine;

/// Gives up joining after this long without success.
const JOIN_DEADLINE: Duration = Duration::from_secs(600);

fn normalise(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.starts_with("http://") || url.starts_with("https://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// Asks the members in `config.join` (in turn, with retries) to add this node, then waits
/// until the membership reached this node. A restarted node whose data dir already holds a
/// membership skips this: it rejoins by itself.
pub async fn join_cluster(engine: &Engine, config: &Config) -> anyhow::Result<()> {
    if engine.cluster().is_initialized().await {
        tracing::info!("data dir already belongs to a cluster; rejoining without --join");
        return Ok(());
    }
    if matches!(config.raft_security, RaftSecurity::ClusterPki) {
        return join_with_certificate(engine, config).await;
    }
    let client = reqwest::Client::builder()
        // A follower answers 307 with the leader's admin URL; followed by hand below so the
        // token goes with it.
        .redirect(reqwest::redirect::Policy::none())
        // Catch-up of a large state happens inside the call.
        .timeout(Duration::from_secs(330))
        .connect_timeout(Duration::from_secs(3))
        .build()
        .context("HTTP client")?;
    let body = json!({
        "node_id": config.node_id,
        "raft_addr": config.raft_advertise,
        "admin_addr": config.admin_advertise,
        "kms_addr": config.kms_advertise(),
        "dns": crate::dns::advert(config),
    });
    let started = Instant::now();
    let mut delay = Duration::from_millis(300);
    // A join list may name every member, this node included (e.g. one list for all pods).
    let own = normalise(&config.admin_advertise);
    let urls: Vec<&String> = config.join.iter().filter(|u| normalise(u) != own).collect();
    if urls.is_empty() {
        anyhow::bail!("--join names only this node itself ({own})");
    }
    loop {
        for url in &urls {
            let mut endpoint = format!("{}/api/v1/cluster/join", normalise(url));
            let mut response = None;
            for _ in 0..3 {
                let mut request = client.post(&endpoint).json(&body);
                if let Some(token) = &config.admin_token {
                    request = request.bearer_auth(token);
                }
                let result = request.send().await;
                let location = result
                    .as_ref()
                    .ok()
                    .filter(|r| r.status().as_u16() == 307)
                    .and_then(|r| {
                        r.headers()
                            .get(reqwest::header::LOCATION)
                            .and_then(|l| l.to_str().ok())
                            .map(str::to_owned)
                    });
                match location {
                    Some(next) => {
                        tracing::info!(via = %endpoint, leader = %next, "joining through the leader");
                        endpoint = next;
                    }
                    None => {
                        response = Some(result);
                        break;
                    }
                }
            }
            let Some(response) = response else { continue };
            match response {
                Ok(response) if response.status().is_success() => {
                    tracing::info!(via = %endpoint, "joined the cluster");
                    return wait_for_membership(engine).await;
                }
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    // A wrong token or a refused request will not fix itself.
                    if matches!(status.as_u16(), 400 | 401 | 403 | 404) {
                        anyhow::bail!("join via {endpoint} refused: {status} {text}");
                    }
                    tracing::warn!(via = %endpoint, %status, body = %text, "join not accepted yet; retrying");
                }
                Err(e) => {
                    tracing::warn!(via = %endpoint, error = %e, "cluster member not reachable; retrying")
                }
            }
        }
        if started.elapsed() > JOIN_DEADLINE {
            anyhow::bail!(
                "could not join any of {:?} within {JOIN_DEADLINE:?}",
                config.join
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Asks the leader (found through any member named by `--join`) to add this enrolled node.
async fn join_with_certificate(engine: &Engine, config: &Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(300);
    let own = &config.raft_advertise;
    let mut targets: Vec<String> = config.join.iter().filter(|a| *a != own).cloned().collect();
    if targets.is_empty() {
        anyhow::bail!("--join names only this node itself ({own})");
    }
    let node = engine.cluster().advertised().clone();
    loop {
        let mut next = Vec::new();
        for addr in &targets {
            match engine
                .cluster()
                .transport()
                .join(addr, &node, Duration::from_secs(330))
                .await
            {
                Ok(leader) => {
                    tracing::info!(via = %addr, leader, "joined the cluster");
                    return wait_for_membership(engine).await;
                }
                Err(TransportError::Redirect(leader)) if !leader.is_empty() => next.push(leader),
                Err(TransportError::Refused(m)) => anyhow::bail!("join refused: {m}"),
                Err(e) => {
                    tracing::warn!(via = %addr, error = %e, "join not accepted yet; retrying")
                }
            }
        }
        if started.elapsed() > JOIN_DEADLINE {
            anyhow::bail!(
                "could not join any of {:?} within {JOIN_DEADLINE:?}",
                config.join
            );
        }
        if next.is_empty() {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            targets = config.join.iter().filter(|a| *a != own).cloned().collect();
        } else {
            targets = next;
        }
    }
}

async fn wait_for_membership(engine: &Engine) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if engine.cluster().is_initialized().await && engine.view().leader_id.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("joined, but the membership did not reach this node")
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn join_urls_get_a_scheme() {
        assert_eq!(normalise("10.0.0.1:8688"), "http://10.0.0.1:8688");
        assert_eq!(
            normalise("https://kms-0.kms:8688/"),
            "https://kms-0.kms:8688"
        );
    }
}
