"""Small shared helpers: config location, devices, run folders."""
