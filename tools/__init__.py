"""Build-time tools for the contract (protos → gen/)."""
