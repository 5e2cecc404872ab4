//! One cluster's agent tally: who is subscribed, what each acked, and how
//! many hold the latest version (the publisher's `UpdateAck`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use credstream_proto::convert::timestamp;
use credstream_proto::v1::{AgentStatus, UpdateAck};

use super::Cluster;

#[derive(Debug)]
struct AgentEntry {
    conn: u64,
    acked: u64,
    connected_at: SystemTime,
}

/// The agents of one cluster. Every method takes `latest`, the cluster's
/// current version, read by the caller under the cluster lock.
#[derive(Debug, Default)]
pub(super) struct AgentTally {
    agents: HashMap<String, AgentEntry>,
    /// Agents whose ack covers the latest version.
    current: u32,
}

impl AgentTally {
    /// Subscribed agents.
    pub(super) fn len(&self) -> usize {
        self.agents.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Registers stream `conn` of `agent_id`; it replaces an older stream
    /// of the same agent (whose ack no longer counts).
    pub(super) fn connect(&mut self, agent_id: String, conn: u64, latest: u64) {
        let previous = self.agents.insert(
            agent_id,
            AgentEntry {
                conn,
                acked: 0,
                connected_at: SystemTime::now(),
            },
        );
        if previous.is_some_and(|p| p.acked >= latest && latest > 0) {
            self.current = self.current.saturating_sub(1);
        }
    }

    /// Records an ack of `version` from stream `conn` of `agent_id`;
    /// returns true if the count of current agents changed.
    pub(super) fn ack(&mut self, agent_id: &str, conn: u64, version: u64, latest: u64) -> bool {
        let Some(entry) = self.agents.get_mut(agent_id).filter(|e| e.conn == conn) else {
            return false;
        };
        // An ack beyond the latest version (an agent still holding what a
        // previous broker sent) covers no more than the latest.
        let version = version.min(latest);
        if version <= entry.acked {
            return false;
        }
        let was_current = entry.acked >= latest;
        entry.acked = version;
        if !was_current && version >= latest {
            self.current += 1;
            return true;
        }
        false
    }

    /// Removes stream `conn` of `agent_id`, if it is still the agent's
    /// stream; returns true if it was.
    pub(super) fn gone(&mut self, agent_id: &str, conn: u64, latest: u64) -> bool {
        if self.agents.get(agent_id).is_none_or(|e| e.conn != conn) {
            return false;
        }
        let entry = self.agents.remove(agent_id).expect("checked");
        if entry.acked >= latest && latest > 0 {
            self.current = self.current.saturating_sub(1);
        }
        true
    }

    /// A new version was published: nobody holds it yet.
    pub(super) fn new_version(&mut self) {
        self.current = 0;
    }

    /// The ack progress of `latest`, as the publisher receives it.
    pub(super) fn progress(&self, latest: u64) -> UpdateAck {
        UpdateAck {
            version: latest,
            agents_current: self.current,
            agents_connected: self.agents.len() as u32,
        }
    }

    /// Every agent, sorted by id, for `GetCluster`.
    pub(super) fn statuses(&self) -> Vec<AgentStatus> {
        let mut agents: Vec<AgentStatus> = self
            .agents
            .iter()
            .map(|(id, entry)| AgentStatus {
                agent_id: id.clone(),
                acked_version: entry.acked,
                connected_at: Some(timestamp(entry.connected_at)),
            })
            .collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        agents
    }
}

/// Registration of a live agent stream; removes it from the tally on drop
/// (dropping the response stream unsubscribes).
#[derive(Debug)]
pub struct AgentRegistration {
    pub(super) cluster: Arc<Cluster>,
    pub(super) agent_id: String,
    pub(super) conn: u64,
}

impl AgentRegistration {
    /// The cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Records an ack from this agent.
    pub fn ack(&self, version: u64) {
        self.cluster.ack(&self.agent_id, self.conn, version);
    }
}

impl Drop for AgentRegistration {
    fn drop(&mut self) {
        self.cluster.agent_gone(&self.agent_id, self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_acks_of_the_latest_version_count_as_current() {
        let mut tally = AgentTally::default();
        tally.connect("a".into(), 1, 10);
        tally.connect("b".into(), 2, 10);
        assert!(!tally.ack("a", 1, 9, 10), "an older version is not current");
        assert!(tally.ack("a", 1, 10, 10));
        assert!(!tally.ack("a", 1, 10, 10), "a repeated ack counts once");
        // An ack beyond the latest (from a previous broker) counts as the
        // latest, once.
        assert!(tally.ack("b", 2, 99, 10));
        assert_eq!(tally.progress(10).agents_current, 2);
        assert!(
            !tally.ack("b", 9, 10, 10),
            "another stream's ack is ignored"
        );

        tally.new_version();
        assert_eq!(tally.progress(11).agents_current, 0);
        assert_eq!(tally.progress(11).agents_connected, 2);
    }

    #[test]
    fn a_replaced_or_gone_stream_leaves_the_count() {
        let mut tally = AgentTally::default();
        tally.connect("a".into(), 1, 10);
        assert!(tally.ack("a", 1, 10, 10));
        // The same agent reconnects: its old ack no longer counts.
        tally.connect("a".into(), 2, 10);
        assert_eq!(tally.progress(10).agents_current, 0);
        assert_eq!(tally.len(), 1);
        assert!(
            !tally.gone("a", 1, 10),
            "the old stream is no longer the agent's"
        );
        assert_eq!(tally.len(), 1);
        assert!(tally.ack("a", 2, 10, 10));
        assert!(tally.gone("a", 2, 10));
        assert!(tally.is_empty());
        assert_eq!(tally.progress(10).agents_current, 0);
    }
}
