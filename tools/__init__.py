"""Developer tools for stealer (cluster emulator, …); not part of the installed package."""
