"""The anomaly job over CDRs: rules in YAML, set-based SQL, findings and automatic blocks."""
