"""Lightning callbacks for ling-train, one per file, each usable alone from YAML."""
