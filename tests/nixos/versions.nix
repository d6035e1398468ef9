# The fake driver versions of the NixOS VM tests (the same as tests/fake-driver/build's).
{
  old = "580.95.05";
  new = "580.105.08";
}
