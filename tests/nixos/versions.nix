# The fake driver versions of the NixOS VM tests (the same as tests/fake-driver/build's).
{
  old = "570.124.04";
  new = "570.133.07";
}
