//! A locked room's policy: how a server puts its room under write
//! authority (`syncline_core::auth::governance`).

use syncline_core::AuthorId;
use syncline_store::{DurableRoom, ReplicaError, StoreError};

/// Checks write authority in `room` under `roots` from now on, declaring
/// them in its history unless a policy is there already: a node by this
/// replica's key (a root itself), signed as it is made, since a server
/// exports others' nodes with the signatures they came with and this one
/// has no other. `now_ms` is its wall clock.
pub fn govern(
    room: &mut DurableRoom,
    roots: Vec<AuthorId>,
    now_ms: u64,
) -> Result<(), ReplicaError> {
    room.govern(roots.clone());
    let governed = room
        .room()
        .dag()
        .governance()
        .is_some_and(|g| g.is_governed());
    if governed {
        return Ok(());
    }
    room.with_room(|r, key| {
        let mut tx = r.begin(key.author(), now_ms);
        tx.declare_policy(&roots)?;
        if let Some(c) = tx.commit()? {
            let id = r.dag().id(c.idx);
            r.set_signature(c.idx, key.sign(&id));
        }
        Ok::<_, syncline_core::room::TxnError>(())
    })?
    .map_err(|e| {
        ReplicaError::Store(StoreError::Corrupt(format!(
            "cannot declare the room's policy: {e}"
        )))
    })
}
