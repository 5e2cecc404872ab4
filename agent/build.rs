// The tool cfgs of the agent's tests: see tests/build/tools.rs.
include!("../tests/build/tools.rs");
