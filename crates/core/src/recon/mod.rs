//! Reconciliation: finding what two replicas' histories lack from each other
//! (`docs/protocol.md` section 5.2). The baseline (heads and version vectors)
//! lives on the DAG; this module holds the set-difference structures used
//! when version vectors would cost more than the difference itself.

pub mod mst;
pub mod riblt;
