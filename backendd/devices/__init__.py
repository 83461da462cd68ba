"""Device backends. Each type registers itself in `base.DEVICE_TYPES` by name."""
