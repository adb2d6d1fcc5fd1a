"""Edge SDK, a library inside existing services: the Emitter publishes usage, the Enforcer answers check()."""
