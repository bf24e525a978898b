from calora_cli.cli import main

main()
