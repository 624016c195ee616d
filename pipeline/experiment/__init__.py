"""The validated experiment: config schema, arms resolved from it, and loading (nothing changes it after)."""
