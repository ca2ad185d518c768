//! Training on several machines: burn-collective's global level.
//!
//! Every machine (a *node*) runs one training process over its local devices; the nodes find
//! each other through one **global orchestrator** ([`serve_orchestrator`], `kiln distill
//! orchestrator`), then sum their gradients peer to peer every step (burn-collective's
//! websocket data service on each node's address). Node `r` with `D` devices owns the global
//! peers `r·D .. r·D + D`, and global peer `g` takes micro-batches `g, g + N·D, …` of each
//! step, so `N` nodes together cover the same `grad_accum` micro-batches as one process.
//!
//! [`NodeConfig`] holds what torchrun users know as `--nnodes`, `--node_rank` and the
//! rendezvous endpoint; [`Trainer::with_nodes`](crate::train::Trainer::with_nodes) joins.

use std::time::Duration;

use burn::collective::CollectiveConfig;

use crate::DistillError;

/// How this process takes part in a multi-node run (builder style).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Number of nodes (processes, usually one per machine) in the run.
    pub nodes: usize,
    /// This node's rank, `0..nodes`: it decides which micro-batches this node trains on.
    /// Rank 0's starting weights are copied to every node when they join.
    pub node_rank: usize,
    /// Where the other nodes reach this node's tensor data service: `ws://host:port` (or
    /// `host:port`), with an address they can route to (not 0.0.0.0).
    pub node_address: String,
    /// The global orchestrator, `ws://host:port` (or `host:port`).
    pub orchestrator: String,
    /// Port the data service listens on (all interfaces); `None` = the port of
    /// `node_address`. Differs only behind port forwarding (containers, NAT).
    pub data_service_port: Option<u16>,
    /// Devices this node trains on (threads, one replica each); the same on every node.
    pub devices_per_node: usize,
    /// How long joining may wait for the orchestrator and the other nodes.
    pub join_timeout: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            nodes: 1,
            node_rank: 0,
            node_address: String::new(),
            orchestrator: String::new(),
            data_service_port: None,
            devices_per_node: 1,
            // torchrun's rendezvous waits 900 s; nodes of one job usually start within minutes.
            join_timeout: Duration::from_secs(300),
        }
    }
}

impl NodeConfig {
    with!(nodes: usize, node_rank: usize, data_service_port: Option<u16>,
          devices_per_node: usize, join_timeout: Duration);

    /// Sets `node_address`.
    pub fn node_address(mut self, v: impl Into<String>) -> Self {
        self.node_address = v.into();
        self
    }

    /// Sets `orchestrator`.
    pub fn orchestrator(mut self, v: impl Into<String>) -> Self {
        self.orchestrator = v.into();
        self
    }

    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), DistillError> {
        if self.nodes == 0 {
            return Err(DistillError::arg(
                "nodes",
                "there must be at least one node",
            ));
        }
        if self.node_rank >= self.nodes {
            return Err(DistillError::arg(
                "node_rank",
                format!(
                    "rank {} is not below the node count {} (ranks are 0..{})",
                    self.node_rank, self.nodes, self.nodes
                ),
            ));
        }
        if self.devices_per_node == 0 {
            return Err(DistillError::arg(
                "devices_per_node",
                "a node needs at least one device",
            ));
        }
        let (_, host, _) = ws_address(&self.node_address, "node_address")?;
        if matches!(host.as_str(), "0.0.0.0" | "[::]") {
            return Err(DistillError::arg(
                "node_address",
                format!(
                    "{host} is where to listen, not an address other nodes can reach; give this \
                     machine's address (the data service listens on all interfaces anyway)"
                ),
            ));
        }
        ws_address(&self.orchestrator, "orchestrator")?;
        if self.data_service_port == Some(0) {
            return Err(DistillError::arg(
                "data_service_port",
                "port 0 cannot be announced to the other nodes",
            ));
        }
        if self.join_timeout.is_zero() {
            return Err(DistillError::arg("join_timeout", "must be positive"));
        }
        Ok(())
    }

    /// Global devices in the run: `nodes × devices_per_node`.
    pub fn global_devices(&self) -> usize {
        self.nodes * self.devices_per_node
    }

    /// The global peer id of this node's local device `d`.
    pub fn global_peer(&self, d: usize) -> usize {
        self.node_rank * self.devices_per_node + d
    }

    /// burn-collective's configuration for this node: local tree all-reduce between its
    /// devices, then a ring all-reduce between the nodes (burn's defaults and advice).
    pub fn collective_config(&self) -> Result<CollectiveConfig, DistillError> {
        self.validate()?;
        let (node, _, port) = ws_address(&self.node_address, "node_address")?;
        let (orchestrator, _, _) = ws_address(&self.orchestrator, "orchestrator")?;
        let nodes =
            u32::try_from(self.nodes).map_err(|_| DistillError::arg("nodes", "too many nodes"))?;
        // `Address` parses any string (its `Err` is never returned); the checks are ours above.
        let addr = |s: String, name: &'static str| {
            s.parse().map_err(|e: String| DistillError::arg(name, e))
        };
        Ok(CollectiveConfig::default()
            .with_num_devices(self.devices_per_node)
            .with_num_nodes(nodes)
            .with_global_address(addr(orchestrator, "orchestrator")?)
            .with_node_address(addr(node, "node_address")?)
            .with_data_service_port(self.data_service_port.unwrap_or(port)))
    }
}

/// `ws://host:port` from `ws://host:port` or `host:port`: the URL, the host and the port.
fn ws_address(s: &str, name: &'static str) -> Result<(String, String, u16), DistillError> {
    let bad = |m: String| Err(DistillError::arg(name, m));
    let rest = match s.split_once("://") {
        Some(("ws", rest)) => rest,
        Some((scheme, _)) => {
            return bad(format!(
                "`{s}`: only ws:// addresses work (burn-collective's websocket transport), not \
                 {scheme}://"
            ));
        }
        None => s,
    };
    if s.is_empty() {
        return bad("missing; give host:port".into());
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return bad(format!("`{s}` has no port; give host:port"));
    };
    if host.is_empty() || host.contains('/') || port.contains('/') {
        return bad(format!("`{s}` is not host:port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((format!("ws://{host}:{p}"), host.to_string(), p)),
        _ => bad(format!("`{port}` in `{s}` is not a port (1-65535)")),
    }
}

/// Runs burn-collective's global orchestrator on `port` (all interfaces) until the process
/// gets Ctrl-C or SIGTERM. One orchestrator serves one run: start it before (or with) the
/// nodes, stop it after they finish. It only introduces the nodes to each other; gradients go
/// node to node.
pub fn serve_orchestrator(port: u16) -> Result<(), DistillError> {
    if port == 0 {
        return Err(DistillError::arg(
            "port",
            "the nodes must be told the port; give one",
        ));
    }
    // burn's server only logs a failed bind and returns; try the port first to report it.
    std::net::TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| DistillError::arg("port", format!("cannot listen on {port}: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| DistillError::Training(format!("starting the orchestrator's runtime: {e}")))?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> NodeConfig {
        NodeConfig::default()
            .nodes(2)
            .node_rank(1)
            .node_address("10.0.0.2:29401")
            .orchestrator("ws://10.0.0.1:29400")
    }

    fn field(c: NodeConfig) -> &'static str {
        match c.validate() {
            Err(DistillError::InvalidArgument { name, .. }) => name,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert!(ok().validate().is_ok());
        assert!(ok().collective_config().unwrap().is_valid());
        assert_eq!(field(ok().nodes(0)), "nodes");
        assert_eq!(field(ok().node_rank(2)), "node_rank");
        assert_eq!(field(ok().devices_per_node(0)), "devices_per_node");
        assert_eq!(field(ok().node_address("")), "node_address");
        assert_eq!(field(ok().node_address("10.0.0.2")), "node_address");
        assert_eq!(field(ok().node_address("0.0.0.0:29401")), "node_address");
        assert_eq!(
            field(ok().node_address("http://10.0.0.2:1")),
            "node_address"
        );
        assert_eq!(field(ok().orchestrator("10.0.0.1:99999")), "orchestrator");
        assert_eq!(field(ok().orchestrator("ws://h:1/x")), "orchestrator");
        assert_eq!(field(ok().data_service_port(Some(0))), "data_service_port");
        assert_eq!(field(ok().join_timeout(Duration::ZERO)), "join_timeout");
    }

    #[test]
    fn peers_and_addresses() {
        let c = ok().devices_per_node(4);
        assert_eq!(c.global_devices(), 8);
        assert_eq!(c.global_peer(3), 7);
        assert_eq!(
            ws_address("[::1]:5", "x").unwrap(),
            ("ws://[::1]:5".into(), "[::1]".into(), 5)
        );
        assert!(serve_orchestrator(0).is_err());
    }
}
