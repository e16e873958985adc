//! See the table in `main.rs`.

#[allow(unused_imports)]
use bramble_tests::daemon::*;
