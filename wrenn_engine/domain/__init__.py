"""Plain data: events, VMConfig and the sandbox state fold. No I/O."""
