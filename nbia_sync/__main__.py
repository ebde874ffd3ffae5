from nbia_sync.cli import run

run()
