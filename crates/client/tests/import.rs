//! `Room::import`: plain maps and exported state, large values cut into
//! several nodes, and refusals that write nothing.

use std::collections::BTreeMap;

use syncline::{Error, Replica, Value};

fn map(pairs: impl IntoIterator<Item = (String, Value)>) -> Value {
    Value::Map(pairs.into_iter().collect::<BTreeMap<_, _>>())
}

#[test]
fn a_large_import_takes_several_nodes_and_round_trips_through_export() {
    let source = Replica::in_memory().unwrap().room("big").unwrap();
    // 3,000 entries with a field each, and long texts: more than a node holds.
    let items =
        map((0..3000).map(|i| (format!("item{i}"), map([("n".to_owned(), Value::Int(i))]))));
    let imported = source.import(&map([("items".to_owned(), items)])).unwrap();
    assert_eq!((imported.entries, imported.fields), (3001, 3000));
    assert!(imported.nodes > 1, "{imported:?}");
    for i in 0..4 {
        source
            .transact(|tx| tx.text_insert(&format!("/doc{i}"), 0, &"x".repeat(100_000)))
            .unwrap();
    }
    let copy = Replica::in_memory().unwrap().room("big").unwrap();
    let again = copy.import(&source.export()).unwrap();
    assert_eq!(again.texts, 4);
    assert!(
        again.nodes >= 2,
        "texts of 400 kB need more than one node: {again:?}"
    );
    assert_eq!(copy.export(), source.export());
    // Importing it again changes nothing.
    assert_eq!(copy.import(&source.export()).unwrap().nodes, 0);
}

#[test]
fn values_that_are_no_document_are_refused_and_write_nothing() {
    let room = Replica::in_memory().unwrap().room("r").unwrap();
    for bad in [
        Value::Array(vec![Value::Int(1)]),
        map([("a/b".to_owned(), map([]))]),
        map([
            ("kind".to_owned(), Value::from("map")),
            ("children".to_owned(), Value::Int(3)),
        ]),
    ] {
        assert!(
            matches!(room.import(&bad), Err(Error::Import { .. })),
            "{bad:?}"
        );
    }
    assert_eq!(room.node_count(), 0);
}
