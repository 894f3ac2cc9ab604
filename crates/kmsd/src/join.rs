//! Joining an existing cluster: ask a member's admin API to add this node.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::config::Config;
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
    let client = reqwest::Client::builder()
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
            let endpoint = format!("{}/api/v1/cluster/join", normalise(url));
            let mut request = client.post(&endpoint).json(&body);
            if let Some(token) = &config.admin_token {
                request = request.bearer_auth(token);
            }
            match request.send().await {
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
