"""The run's configuration: DPOConfig's fields, cross-field checks, value coercion."""
