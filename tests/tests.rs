//! The one integration test binary: real SoftHSM2 tokens, real RocksDB
//! directories, real gRPC over 127.0.0.1.

mod e2e;
