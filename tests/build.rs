// The tool cfgs of the integration tests: see tests/build/tools.rs.
include!("build/tools.rs");
