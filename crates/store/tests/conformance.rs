//! Runs the conformance suite against every backend.

use syncline_store::conformance;
use syncline_store::{FaultPlan, FaultyStore, MemoryStore, SqliteOptions, SqliteStore, Store};

#[test]
fn memory_store_conforms() {
    conformance::run_all(&MemoryStore::new());
}

#[test]
fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db"), SqliteOptions::default()).unwrap();
    conformance::run_all(&store);
}

#[test]
fn faulty_store_without_faults_conforms() {
    conformance::run_all(&FaultyStore::new(FaultPlan::default()));
}

#[test]
fn memory_store_survives_reopen() {
    let disk = MemoryStore::new();
    conformance::run_reopen(&mut || Box::new(disk.clone()));
}

#[test]
fn sqlite_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    conformance::run_reopen(&mut || {
        Box::new(SqliteStore::open(&path, SqliteOptions::default()).unwrap()) as Box<dyn Store>
    });
}

#[test]
fn faulty_store_survives_crash_and_reopen() {
    // Without faults every write is acknowledged, so a crash between
    // "reopens" must lose nothing.
    let disk = FaultyStore::new(FaultPlan {
        fail_after_writes: None,
        seed: 3,
    });
    conformance::run_reopen(&mut || {
        disk.crash();
        Box::new(disk.clone())
    });
}
