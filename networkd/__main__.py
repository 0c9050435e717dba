from networkd.cli import main

main()
