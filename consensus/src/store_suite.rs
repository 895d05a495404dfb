//! openraft's own storage test suite, run against both stores.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

use crate::machine::TypeConfig;
use crate::mem::{MemLogStore, MemStateMachine};
use crate::rocks::{RocksLogStore, RocksStateMachine};

struct MemBuilder;

impl StoreBuilder<TypeConfig, MemLogStore, MemStateMachine, ()> for MemBuilder {
    async fn build(&self) -> Result<((), MemLogStore, MemStateMachine), StorageError<u64>> {
        Ok(((), MemLogStore::default(), MemStateMachine::default()))
    }
}

struct RocksBuilder;

impl StoreBuilder<TypeConfig, RocksLogStore, RocksStateMachine, tempfile::TempDir>
    for RocksBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, RocksLogStore, RocksStateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = crate::rocks::open(dir.path(), 0)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn mem_store_passes_openraft_suite() -> Result<(), StorageError<u64>> {
    Suite::test_all(MemBuilder)
}

#[test]
fn rocks_store_passes_openraft_suite() -> Result<(), StorageError<u64>> {
    Suite::test_all(RocksBuilder)
}
