from kici.cli.main import main

main()
