# reject_executables.py: refuse programs by their content, not by their name.
#
# Renaming "tool.exe" to "report.pdf" fools a name filter, not this script:
# when an upload is complete (pre-publish: every byte arrived, the file is
# still hidden), it reads the first bytes and refuses Windows, Linux and macOS
# executables and scripts with a "#!" line. A refused upload is deleted (or
# moved to [uploads] quarantine) and never appears under its name.
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event  = "pre-publish"
#   script = "reject_executables.py"
#   paths  = ["/inbox/**"]          # omit to check every upload
#   allow  = ["read"]               # api.file
#
# Try it:  scriptsftp script test reject_executables.py --event pre-publish \
#              --path /inbox/report.pdf --file ./some-file

# (first bytes, what they are); the longest signature is 4 bytes.
SIGNATURES = [
    (b"MZ", "a Windows program (EXE/DLL)"),
    (b"\x7fELF", "a Linux/Unix program (ELF)"),
    (b"\xfe\xed\xfa\xce", "a macOS program (Mach-O)"),
    (b"\xfe\xed\xfa\xcf", "a macOS program (Mach-O)"),
    (b"\xce\xfa\xed\xfe", "a macOS program (Mach-O)"),
    (b"\xcf\xfa\xed\xfe", "a macOS program (Mach-O)"),
    (b"\xca\xfe\xba\xbe", "a macOS universal program or a Java class"),
    (b"#!", "a script with an interpreter line (#!)"),
]


def on_pre_publish(event, api):
    head = api.file.read(4)
    for magic, what in SIGNATURES:
        if head.startswith(magic):
            api.log("rejected executable", path=event.path, kind=what)
            api.veto(event.path + " looks like " + what
                     + "; executables are not accepted here")
