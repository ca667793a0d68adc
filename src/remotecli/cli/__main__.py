from remotecli.cli.main import main

main(prog_name="remotecli")
