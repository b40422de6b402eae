"""Models the appliance holds: imported or built artifacts, each hashed into a manifest."""
