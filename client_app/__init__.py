"""The ClientApp that runs on every device."""
